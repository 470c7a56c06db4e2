// IPluginV3 `InfLLMv2Attention` (version "1", namespace ""): the edgecpm::InfLLMv2Attention node of
// the decoder graph (export/custom_ops.py) on the kernels of plugins/src/infllmv2.cu.
//
// inputs  0 q [T, Hq, D]  1 k [T, Hkv, D]  2 v  3 past_k [P, Hkv, D]  4 past_v  5 past_ck [C, Hkv, D] f32
//         6 positions [T] int32|int64   7 attn_mask [T, T] bool|int32
// outputs 0 out [T, Hq, D] (q's type)   1 ck_new [Cn, Hkv, D] f32, Cn = n_chunks(P + T) - n_chunks(P)
// `edgecpm build` casts positions and attn_mask to int32 (TensorRT documents bool/uint8 as
// unsupported for plugin I/O); int64 and bool are accepted too where a TensorRT offers them.
// Draft-tree verification passes positions = P + depth and the ancestor mask: the kernels apply
// every rule by position, not by cache slot (include/edgecpm_kernels.h), so trees stay lossless.
#include <cstring>

#include "plugin_common.h"

namespace ecpm_trt {
namespace {

enum Field { kKernelSize, kKernelStride, kBlockSize, kInitBlocks, kWindowSize, kTopk, kDenseLen, kSemantics };
enum Input { kQ, kK, kV, kPastK, kPastV, kPastCk, kPositions, kMask, kNbInputs };

class InfLLMv2Plugin : public PluginBase {
public:
    static constexpr char const* kName = "InfLLMv2Attention";
    static std::vector<char const*> fieldNames() {
        return {"kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk", "dense_len",
                "semantics"};
    }
    static bool valid(IntFields const& f) {
        ecpm_infllmv2_config c = config(f);
        if (ecpm_infllmv2_check_config(&c) == ECPM_OK) return true;
        log_error("InfLLMv2Attention: attributes need kernel_size = 2*kernel_stride, block_size = 4*kernel_stride, "
                  "window_size a multiple of block_size and semantics 1 or 2");
        return false;
    }
    static ecpm_infllmv2_config config(IntFields const& f) {
        return {f.get(kKernelSize), f.get(kKernelStride), f.get(kBlockSize), f.get(kInitBlocks),
                f.get(kWindowSize), f.get(kTopk),         f.get(kDenseLen),  f.get(kSemantics)};
    }

    explicit InfLLMv2Plugin(IntFields const& f) : fields_(f), cfg_(config(f)) {}

    // ---- core
    char const* getPluginName() const noexcept override { return kName; }
    IPluginV3* clone() noexcept override {
        try {
            return new InfLLMv2Plugin(fields_);
        } catch (...) {
            return nullptr;
        }
    }

    // ---- build
    int32_t getNbOutputs() const noexcept override { return 2; }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const
        noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 2) return 1;
        out[0] = in[kQ];
        out[1] = DataType::kFLOAT;
        return 0;
    }

    // n_chunks(L) = max(L - kernel_size + stride, 0) floordiv stride: 0 below one kernel, else
    // (L - kernel_size) / stride + 1 -- the data-independent size of ck_new, in dimension arithmetic.
    IDimensionExpr const* nChunks(IDimensionExpr const& length, IExprBuilder& b) const {
        auto shifted = b.operation(DimensionOperation::kSUM, length,
                                   *b.constant(cfg_.kernel_stride - cfg_.kernel_size));
        auto clamped = b.operation(DimensionOperation::kMAX, *shifted, *b.constant(0));
        return b.operation(DimensionOperation::kFLOOR_DIV, *clamped, *b.constant(cfg_.kernel_stride));
    }

    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder& b) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 2 || in[kQ].nbDims != 3 || in[kK].nbDims != 3 ||
            in[kPastK].nbDims != 3)
            return 1;
        out[0] = in[kQ];
        IDimensionExpr const& T = *in[kK].d[0];
        IDimensionExpr const& P = *in[kPastK].d[0];
        auto S = b.operation(DimensionOperation::kSUM, P, T);
        out[1].nbDims = 3;
        out[1].d[0] = b.operation(DimensionOperation::kSUB, *nChunks(*S, b), *nChunks(P, b));
        out[1].d[1] = in[kK].d[1];
        out[1].d[2] = in[kK].d[2];
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 2 || !is_linear(io[pos].desc)) return false;
        DataType const t = io[pos].desc.type;
        switch (pos) {
            case kQ: return t == DataType::kFLOAT || t == DataType::kHALF;
            case kK: case kV: case kPastK: case kPastV: return t == io[kQ].desc.type;
            case kPastCk: return t == DataType::kFLOAT;
            case kPositions: return t == DataType::kINT32 || t == DataType::kINT64;
            case kMask: return t == DataType::kINT32 || t == DataType::kBOOL;
            case kNbInputs: return t == io[kQ].desc.type;  // out
            default: return t == DataType::kFLOAT;         // ck_new
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 2) return 1;
        Dims const& q = in[kQ].desc.dims;
        Dims const& k = in[kK].desc.dims;
        // Static head counts/dims are known at build time: refuse what the kernels cannot run.
        if (q.d[1] > 0 && k.d[1] > 0 && q.d[1] % k.d[1] != 0) {
            log_error("InfLLMv2Attention: query heads must be a multiple of kv heads");
            return 1;
        }
        if (q.d[2] > 0 && (q.d[2] % 8 != 0 || q.d[2] > 256)) {
            log_error("InfLLMv2Attention: head_dim must be a multiple of 8 and at most 256");
            return 1;
        }
        return 0;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        if (nbInputs != kNbInputs) return 0;
        ecpm_attn_dims d = dims(in[kQ].max, in[kK].max, in[kPastK].max);
        size_t n = ecpm_infllmv2_workspace_size(d, &cfg_);
        // A smaller T may take the decode path, whose scratch differs: size for both.
        ecpm_attn_dims small = d;
        small.T = d.T < ECPM_DECODE_MAX_T ? d.T : ECPM_DECODE_MAX_T;
        size_t n_small = ecpm_infllmv2_workspace_size(small, &cfg_);
        return conversions(d.T) + (n > n_small ? n : n_small);
    }

    // ---- runtime
    int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        ecpm_attn_dims d = dims(inDesc[kQ].dims, inDesc[kK].dims, inDesc[kPastK].dims);
        if (d.T == 0) return 0;
        char* ws = static_cast<char*>(workspace);
        size_t const conv = conversions(d.T);
        // positions and mask in the kernels' types (int32, uint8), converted when TensorRT gave others.
        int32_t const* pos = static_cast<int32_t const*>(inputs[kPositions]);
        uint8_t const* mask = static_cast<uint8_t const*>(inputs[kMask]);
        int status = ECPM_OK;
        if (inDesc[kPositions].type != DataType::kINT32) {
            int32_t* p = reinterpret_cast<int32_t*>(ws);
            status = ecpm_convert_index(inputs[kPositions], 8, p, d.T, stream);
            pos = p;
        }
        if (status == ECPM_OK && inDesc[kMask].type != DataType::kBOOL) {
            uint8_t* m = reinterpret_cast<uint8_t*>(ws + align(d.T * sizeof(int32_t)));
            status = ecpm_convert_mask(inputs[kMask], 4, m, d.T * d.T, stream);
            mask = m;
        }
        if (status == ECPM_OK) {
            size_t const need = ecpm_infllmv2_workspace_size(d, &cfg_);
            status = ecpm_infllmv2_forward(to_ecpm(inDesc[kQ].type), inputs[kQ], inputs[kK], inputs[kV],
                                           inputs[kPastK], inputs[kPastV], static_cast<float const*>(inputs[kPastCk]),
                                           pos, mask, d, &cfg_, outputs[0], static_cast<float*>(outputs[1]),
                                           ws + conv, need, stream);
        }
        if (status != ECPM_OK) {
            log_error(std::string("InfLLMv2Attention: ") + ecpm_status_string(status));
            return 1;
        }
        return 0;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return fields_.collection(); }

private:
    static size_t align(size_t n) { return (n + 255) / 256 * 256; }
    static size_t conversions(int64_t T) { return align(T * sizeof(int32_t)) + align(T * T); }
    static ecpm_attn_dims dims(Dims const& q, Dims const& k, Dims const& past_k) {
        ecpm_attn_dims d{};
        d.T = q.d[0];
        d.Hq = static_cast<int32_t>(q.d[1]);
        d.D = static_cast<int32_t>(q.d[2]);
        d.Hkv = static_cast<int32_t>(k.d[1]);
        d.P = past_k.d[0];
        return d;
    }

    IntFields fields_;
    ecpm_infllmv2_config cfg_;
};

}  // namespace

IPluginCreatorInterface* infllmv2_creator() {
    static Creator<InfLLMv2Plugin> creator;
    return &creator;
}

}  // namespace ecpm_trt
