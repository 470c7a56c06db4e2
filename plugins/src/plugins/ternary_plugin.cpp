// IPluginV3 `TernaryMatMul` (version "1", namespace ""): the lead's edgecpm::TernaryMatMul contract
// on the kernels of plugins/src/ternary.cu.
//
// inputs  0 x [..., K] fp16|fp32   1 packed [N, ceil(K/16)] uint32 codes   2 scales [N, K / group_size] (x's type)
// output  0 y [..., N] (x's type)
// attributes in_features (K), group_size.
// TensorRT has no uint32: `edgecpm build` retypes the packed initializers as int32 (same bytes) and
// the kernels read them as uint32.
#include "plugin_common.h"

namespace ecpm_trt {
namespace {

enum Field { kInFeatures, kGroupSize };
enum Input { kX, kPacked, kScales, kNbInputs };

class TernaryPlugin : public PluginBase {
public:
    static constexpr char const* kName = "TernaryMatMul";
    static std::vector<char const*> fieldNames() { return {"in_features", "group_size"}; }
    static bool valid(IntFields const& f) {
        if (f.get(kInFeatures) > 0 && f.get(kGroupSize) > 0 && f.get(kInFeatures) % f.get(kGroupSize) == 0)
            return true;
        log_error("TernaryMatMul: in_features and group_size must be positive, in_features a multiple of group_size");
        return false;
    }

    explicit TernaryPlugin(IntFields const& f) : fields_(f), K_(f.get(kInFeatures)), gs_(f.get(kGroupSize)) {}

    // ---- core
    char const* getPluginName() const noexcept override { return kName; }
    IPluginV3* clone() noexcept override {
        try {
            return new TernaryPlugin(fields_);
        } catch (...) {
            return nullptr;
        }
    }

    // ---- build
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const
        noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1) return 1;
        out[0] = in[kX];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder&) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1 || in[kX].nbDims < 1 || in[kPacked].nbDims != 2) return 1;
        out[0] = in[kX];
        out[0].d[in[kX].nbDims - 1] = in[kPacked].d[0];  // [..., K] -> [..., N]
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1 || !is_linear(io[pos].desc)) return false;
        DataType const t = io[pos].desc.type;
        switch (pos) {
            case kX: return t == DataType::kFLOAT || t == DataType::kHALF;
            case kPacked: return t == DataType::kINT32;
            default: return t == io[kX].desc.type;  // scales, y
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1) return 1;
        Dims const& x = in[kX].desc.dims;
        Dims const& p = in[kPacked].desc.dims;
        Dims const& s = in[kScales].desc.dims;
        int64_t const k = x.d[x.nbDims - 1];
        bool ok = (k < 0 || k == K_) && (p.d[1] < 0 || p.d[1] == (K_ + 15) / 16) && s.nbDims == 2 &&
                  (s.d[1] < 0 || s.d[1] == K_ / gs_) && (p.d[0] < 0 || s.d[0] < 0 || p.d[0] == s.d[0]);
        if (!ok) log_error("TernaryMatMul: input shapes do not match in_features/group_size (x [.., K], packed "
                           "[N, ceil(K/16)], scales [N, K/group_size])");
        return ok ? 0 : 1;
    }

    // ---- runtime
    int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void*, cudaStream_t stream) noexcept override {
        Dims const& x = inDesc[kX].dims;
        int64_t const M = volume(x, 0, x.nbDims - 1), N = inDesc[kPacked].dims.d[0];
        int const status = ecpm_ternary_matmul(to_ecpm(inDesc[kX].type), inputs[kX],
                                               static_cast<uint32_t const*>(inputs[kPacked]), inputs[kScales],
                                               outputs[0], M, N, K_, gs_, stream);
        if (status != ECPM_OK) {
            log_error(std::string("TernaryMatMul: ") + ecpm_status_string(status));
            return 1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return fields_.collection(); }

private:
    IntFields fields_;
    int64_t K_, gs_;
};

}  // namespace

IPluginCreatorInterface* ternary_creator() {
    static Creator<TernaryPlugin> creator;
    return &creator;
}

}  // namespace ecpm_trt
