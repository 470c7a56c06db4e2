// libedgecpm_plugins.so entry points (TensorRT 10 plugin shared library): TensorRT's
// IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, tensorrt.get_plugin_registry().load_library)
// looks up `setLoggerFinder` and `getCreators`. Also the helpers of plugin_common.h.
#include <atomic>
#include <cstdio>
#include <cstring>

#include "plugin_common.h"

namespace ecpm_trt {

IPluginCreatorInterface* infllmv2_creator();
IPluginCreatorInterface* ternary_creator();

namespace {
std::atomic<ILoggerFinder*> g_finder{nullptr};
}

void log_error(std::string const& msg) noexcept {
    ILoggerFinder* finder = g_finder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger)
        logger->log(ILogger::Severity::kERROR, msg.c_str());
    else
        std::fprintf(stderr, "edgecpm plugins: %s\n", msg.c_str());
}

bool IntFields::parse(PluginFieldCollection const* fc, char const* plugin) noexcept {
    std::vector<bool> seen(names_.size(), false);
    for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        for (size_t j = 0; j < names_.size(); ++j) {
            if (f.name == nullptr || std::strcmp(names_[j], f.name) != 0 || f.length != 1 || f.data == nullptr) continue;
            if (f.type == PluginFieldType::kINT32) {
                values_[j] = *static_cast<int32_t const*>(f.data);
            } else if (f.type == PluginFieldType::kINT64) {
                values_[j] = static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
            } else {
                continue;
            }
            seen[j] = true;
        }
    }
    for (size_t j = 0; j < names_.size(); ++j)
        if (!seen[j]) {
            log_error(std::string(plugin) + ": missing int attribute '" + names_[j] + "'");
            return false;
        }
    return true;
}

PluginFieldCollection const* IntFields::collection() noexcept {
    fields_.clear();
    for (size_t j = 0; j < names_.size(); ++j)
        fields_.emplace_back(names_[j], &values_[j], PluginFieldType::kINT32, 1);
    fc_.nbFields = static_cast<int32_t>(fields_.size());
    fc_.fields = fields_.data();
    return &fc_;
}

void IntFields::describe(std::vector<char const*> const& names, std::vector<PluginField>& storage,
                         PluginFieldCollection& fc) {
    storage.clear();
    for (char const* n : names) storage.emplace_back(n, nullptr, PluginFieldType::kINT32, 1);
    fc.nbFields = static_cast<int32_t>(storage.size());
    fc.fields = storage.data();
}

}  // namespace ecpm_trt

extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    ecpm_trt::g_finder.store(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static nvinfer1::IPluginCreatorInterface* const creators[] = {ecpm_trt::infllmv2_creator(),
                                                                  ecpm_trt::ternary_creator()};
    nbCreators = 2;
    return creators;
}

}  // extern "C"
