// Host-side checks of the IPluginV3 glue, runnable without a GPU and without libnvinfer (TensorRT
// headers only): creators and their fields, attribute parsing and serialization round trips,
// output types, format support and -- through a fake IExprBuilder that folds constants -- the
// shape inference, including ck_new's Cn = n_chunks(P + T) - n_chunks(P) for many P, T.
// Built with libedgecpm_plugins.so by plugins/CMakeLists.txt; run by plugins/build_kernels.sh.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

using namespace nvinfer1;

namespace {

int g_checks = 0, g_failures = 0;
void check(bool ok, std::string const& what) {
    ++g_checks;
    if (!ok) {
        ++g_failures;
        std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    }
}

// ---- a constant-folding expression builder -------------------------------------------------------
struct ConstImpl final : apiv::VDimensionExpr {
    int64_t value = 0;
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return value; }
    bool isSizeTensor() const override { return false; }
};
struct Const final : IDimensionExpr {
    ConstImpl impl;
    explicit Const(int64_t v) {
        impl.value = v;
        mImpl = &impl;
    }
};
int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

struct BuilderImpl final : apiv::VExprBuilder {
    std::deque<Const> pool;  // stable addresses
    IDimensionExpr const* constant(int64_t v) override { return &pool.emplace_back(v); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        int64_t const x = a.getConstantValue(), y = b.getConstantValue();
        int64_t r = 0;
        switch (op) {
            case DimensionOperation::kSUM: r = x + y; break;
            case DimensionOperation::kPROD: r = x * y; break;
            case DimensionOperation::kMAX: r = x > y ? x : y; break;
            case DimensionOperation::kMIN: r = x < y ? x : y; break;
            case DimensionOperation::kSUB: r = x - y; break;
            case DimensionOperation::kEQUAL: r = x == y; break;
            case DimensionOperation::kLESS: r = x < y; break;
            case DimensionOperation::kFLOOR_DIV: r = floor_div(x, y); break;
            case DimensionOperation::kCEIL_DIV: r = -floor_div(-x, y); break;
        }
        return constant(r);
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
        return nullptr;
    }
};
struct Builder final : IExprBuilder {
    BuilderImpl impl;
    Builder() { mImpl = &impl; }
    DimsExprs dims(std::vector<int64_t> const& v) {
        DimsExprs d{};
        d.nbDims = static_cast<int32_t>(v.size());
        for (size_t i = 0; i < v.size(); ++i) d.d[i] = impl.constant(v[i]);
        return d;
    }
};

// ---- helpers --------------------------------------------------------------------------------------
IPluginCreatorV3One* creator(char const* name) {
    int32_t n = 0;
    IPluginCreatorInterface* const* list = getCreators(n);
    for (int32_t i = 0; i < n; ++i) {
        if (std::strcmp(list[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
        auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
        if (std::strcmp(c->getPluginName(), name) == 0) return c;
    }
    return nullptr;
}

struct Fields {
    std::vector<std::string> names;
    std::vector<int32_t> values;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};
    PluginFieldCollection const* make() {
        fields.clear();
        for (size_t i = 0; i < names.size(); ++i)
            fields.emplace_back(names[i].c_str(), &values[i], PluginFieldType::kINT32, 1);
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
};

IPluginV3OneBuild* build_of(IPluginV3* p) {
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}

DynamicPluginTensorDesc desc(DataType t) {
    DynamicPluginTensorDesc d{};
    d.desc.type = t;
    d.desc.format = TensorFormat::kLINEAR;
    return d;
}

int64_t n_chunks(int64_t len, int ks, int st) { return len < ks ? 0 : (len - ks) / st + 1; }

// ---- InfLLMv2Attention ------------------------------------------------------------------------------
void check_infllmv2() {
    IPluginCreatorV3One* c = creator("InfLLMv2Attention");
    check(c != nullptr, "InfLLMv2Attention creator is exported by getCreators");
    if (!c) return;
    check(std::strcmp(c->getPluginVersion(), "1") == 0 && std::strcmp(c->getPluginNamespace(), "") == 0,
          "InfLLMv2Attention version \"1\", namespace \"\"");
    PluginFieldCollection const* names = c->getFieldNames();
    check(names->nbFields == 8, "InfLLMv2Attention advertises 8 fields");

    Fields f{{"kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk", "dense_len",
              "semantics"},
             {32, 16, 64, 1, 2048, 64, 8192, 1}};
    IPluginV3* p = c->createPlugin("attn", f.make(), TensorRTPhase::kBUILD);
    check(p != nullptr, "createPlugin with the default InfLLM v2 attributes");
    if (!p) return;

    Fields missing = f;
    missing.names.pop_back();
    missing.values.pop_back();
    check(c->createPlugin("attn", missing.make(), TensorRTPhase::kBUILD) == nullptr, "a missing attribute is refused");
    Fields bad = f;
    bad.values[0] = 48;  // kernel_size != 2 * kernel_stride
    check(c->createPlugin("attn", bad.make(), TensorRTPhase::kBUILD) == nullptr, "inconsistent attributes are refused");

    // Serialization round trip through the runtime-phase creator.
    auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser = rt->getFieldsToSerialize();
    check(ser->nbFields == 8, "8 fields serialized");
    IPluginV3* again = c->createPlugin("attn", ser, TensorRTPhase::kRUNTIME);
    check(again != nullptr, "plugin recreated from its serialized fields");
    bool same = again != nullptr;
    if (again) {
        PluginFieldCollection const* ser2 =
            static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                ->getFieldsToSerialize();
        for (int i = 0; i < 8 && same; ++i)
            same = std::strcmp(ser->fields[i].name, ser2->fields[i].name) == 0 &&
                   *static_cast<int32_t const*>(ser->fields[i].data) == *static_cast<int32_t const*>(ser2->fields[i].data);
        delete again;
    }
    check(same, "serialized fields round-trip unchanged");

    IPluginV3OneBuild* b = build_of(p);
    check(b->getNbOutputs() == 2, "InfLLMv2Attention has 2 outputs");
    DataType in_t[8] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF,
                        DataType::kHALF, DataType::kFLOAT, DataType::kINT32, DataType::kINT32};
    DataType out_t[2];
    check(b->getOutputDataTypes(out_t, 2, in_t, 8) == 0 && out_t[0] == DataType::kHALF && out_t[1] == DataType::kFLOAT,
          "output types: out = q's type, ck_new = float");

    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kHALF), desc(DataType::kHALF),  desc(DataType::kHALF),
                                               desc(DataType::kHALF), desc(DataType::kHALF),  desc(DataType::kFLOAT),
                                               desc(DataType::kINT32), desc(DataType::kINT32), desc(DataType::kHALF),
                                               desc(DataType::kFLOAT)};
    bool all = true;
    for (int pos = 0; pos < 10; ++pos) all = all && b->supportsFormatCombination(pos, io.data(), 8, 2);
    check(all, "fp16 q/k/v/cache, fp32 compressed keys, int32 positions and mask are supported");
    io[1] = desc(DataType::kFLOAT);
    check(!b->supportsFormatCombination(1, io.data(), 8, 2), "k must have q's type");
    io[6] = desc(DataType::kFLOAT);
    check(!b->supportsFormatCombination(6, io.data(), 8, 2), "float positions are refused");
    io[6] = desc(DataType::kINT64);
    check(b->supportsFormatCombination(6, io.data(), 8, 2), "int64 positions are accepted");

    // Shapes: out = q; ck_new = [n_chunks(P + T) - n_chunks(P), Hkv, D].
    bool shapes_ok = true;
    for (int64_t P : {0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 100, 1000, 32767, 131072}) {
        for (int64_t T : {1, 2, 15, 16, 17, 31, 32, 33, 64, 100, 512}) {
            Builder eb;
            DimsExprs in[8] = {eb.dims({T, 32, 128}), eb.dims({T, 2, 128}), eb.dims({T, 2, 128}),
                               eb.dims({P, 2, 128}), eb.dims({P, 2, 128}), eb.dims({n_chunks(P, 32, 16), 2, 128}),
                               eb.dims({T}),          eb.dims({T, T})};
            DimsExprs out[2];
            if (b->getOutputShapes(in, 8, nullptr, 0, out, 2, eb) != 0) {
                shapes_ok = false;
                continue;
            }
            int64_t const want = n_chunks(P + T, 32, 16) - n_chunks(P, 32, 16);
            shapes_ok = shapes_ok && out[0].nbDims == 3 && out[0].d[0]->getConstantValue() == T &&
                        out[0].d[1]->getConstantValue() == 32 && out[1].nbDims == 3 &&
                        out[1].d[0]->getConstantValue() == want && out[1].d[1]->getConstantValue() == 2 &&
                        out[1].d[2]->getConstantValue() == 128;
            if (!shapes_ok) {
                std::fprintf(stderr, "  P=%lld T=%lld: ck_new rows %lld, want %lld\n", (long long)P, (long long)T,
                             (long long)out[1].d[0]->getConstantValue(), (long long)want);
                break;
            }
        }
    }
    check(shapes_ok, "getOutputShapes: out = q, ck_new rows = n_chunks(P+T) - n_chunks(P)");

    std::vector<DynamicPluginTensorDesc> ws(8);
    auto set = [&](int i, std::vector<int64_t> dims) {
        ws[i].max.nbDims = static_cast<int32_t>(dims.size());
        for (size_t j = 0; j < dims.size(); ++j) ws[i].max.d[j] = dims[j];
    };
    set(0, {512, 32, 128});
    set(1, {512, 2, 128});
    set(3, {32768, 2, 128});
    check(b->getWorkspaceSize(ws.data(), 8, nullptr, 2) > 0, "workspace sized from the profile's max shapes");
    delete p;
}

// ---- TernaryMatMul ------------------------------------------------------------------------------
void check_ternary() {
    IPluginCreatorV3One* c = creator("TernaryMatMul");
    check(c != nullptr, "TernaryMatMul creator is exported by getCreators");
    if (!c) return;
    check(c->getFieldNames()->nbFields == 2, "TernaryMatMul advertises in_features, group_size");
    Fields f{{"in_features", "group_size"}, {4096, 128}};
    IPluginV3* p = c->createPlugin("tmm", f.make(), TensorRTPhase::kBUILD);
    check(p != nullptr, "createPlugin(in_features=4096, group_size=128)");
    Fields bad = f;
    bad.values[1] = 100;  // 4096 % 100 != 0
    check(c->createPlugin("tmm", bad.make(), TensorRTPhase::kBUILD) == nullptr, "group_size must divide in_features");
    if (!p) return;
    IPluginV3OneBuild* b = build_of(p);
    Builder eb;
    DimsExprs in[3] = {eb.dims({7, 4096}), eb.dims({11008, 256}), eb.dims({11008, 32})};
    DimsExprs out[1];
    check(b->getOutputShapes(in, 3, nullptr, 0, out, 1, eb) == 0 && out[0].nbDims == 2 &&
              out[0].d[0]->getConstantValue() == 7 && out[0].d[1]->getConstantValue() == 11008,
          "TernaryMatMul output [M, N]");
    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kHALF), desc(DataType::kINT32), desc(DataType::kHALF),
                                               desc(DataType::kHALF)};
    bool all = true;
    for (int pos = 0; pos < 4; ++pos) all = all && b->supportsFormatCombination(pos, io.data(), 3, 1);
    check(all, "fp16 x/scales/y with int32 packed codes are supported");
    io[2] = desc(DataType::kFLOAT);
    check(!b->supportsFormatCombination(2, io.data(), 3, 1), "scales must have x's type");
    delete p;
}

}  // namespace

int main() {
    check_infllmv2();
    check_ternary();
    std::printf("plugin host check: %d/%d checks passed\n", g_checks - g_failures, g_checks);
    return g_failures == 0 ? 0 : 1;
}
