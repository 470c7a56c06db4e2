// What both IPluginV3 plugins share: the capability plumbing, attribute parsing, logging.
//
// The ONNX parser turns a node's INT attributes into kINT32 PluginFields (only the names a
// creator lists in getFieldNames are passed); engines deserialize from getFieldsToSerialize().
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "edgecpm_kernels.h"

namespace ecpm_trt {

using namespace nvinfer1;

constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "";

// Errors go to TensorRT's logger when the library was given one (setLoggerFinder), else stderr.
void log_error(std::string const& msg) noexcept;

// Named int attributes: parsed from PluginFields, serialized back as kINT32 fields.
class IntFields {
public:
    // names: string literals (they must outlive every PluginField pointing at them)
    explicit IntFields(std::vector<char const*> names) : names_(std::move(names)), values_(names_.size(), 0) {}
    // Reads every listed name from fc (kINT32 or kINT64, one value). Returns false, logging which
    // attribute is missing or malformed, when one is absent.
    bool parse(PluginFieldCollection const* fc, char const* plugin) noexcept;
    int32_t get(size_t i) const { return values_[i]; }
    void set(size_t i, int32_t v) { values_[i] = v; }
    PluginFieldCollection const* collection() noexcept;  // valid while this object lives
    // The field list a creator advertises (names only).
    static void describe(std::vector<char const*> const& names, std::vector<PluginField>& storage,
                         PluginFieldCollection& fc);

private:
    std::vector<char const*> names_;
    std::vector<int32_t> values_;
    std::vector<PluginField> fields_;
    PluginFieldCollection fc_{};
};

// An IPluginV3 object that is its own core, build and runtime capability (one object, one clone).
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
public:
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
            case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
            case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
            case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    // No per-context state: a context gets a plain clone.
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override {
        return 0;
    }
};

// A creator for plugin P, whose constructor takes (IntFields const&). P::kName names it.
template <typename P>
class Creator : public IPluginCreatorV3One {
public:
    Creator() { IntFields::describe(P::fieldNames(), storage_, fc_); }
    char const* getPluginName() const noexcept override { return P::kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        try {
            IntFields fields(P::fieldNames());
            if (!fields.parse(fc, P::kName) || !P::valid(fields)) return nullptr;
            return new P(fields);
        } catch (...) {
            log_error(std::string(P::kName) + ": could not create the plugin");
            return nullptr;
        }
    }

private:
    std::vector<PluginField> storage_;
    PluginFieldCollection fc_{};
};

inline bool is_linear(PluginTensorDesc const& d) { return d.format == TensorFormat::kLINEAR; }

inline int64_t volume(Dims const& d, int from = 0, int to = -1) {
    int64_t v = 1;
    for (int i = from; i < (to < 0 ? d.nbDims : to); ++i) v *= d.d[i];
    return v;
}

inline ecpm_dtype to_ecpm(DataType t) { return t == DataType::kHALF ? ECPM_F16 : ECPM_F32; }

}  // namespace ecpm_trt
