// libFuzzer target: any byte string given to SafetensorsFile::from_bytes is either rejected with
// tpa::Error or yields tensors that all read back; anything else (a crash, a sanitizer report, an
// escaping exception of another type) is a bug.
#include <cstddef>
#include <cstdint>
#include <string>
#include <tpa/io/safetensors.hpp>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const tpa::io::SafetensorsFile f =
        tpa::io::SafetensorsFile::from_bytes(std::vector<std::uint8_t>(data, data + size));
    for (const std::string& name : f.names()) {
      const tpa::io::TensorInfo& ti = f.info(name);
      const std::vector<float> v = f.read_f32(name);
      if (static_cast<tpa::Index>(v.size()) != ti.numel()) __builtin_trap();
      if (ti.shape.size() == 2) (void)f.matrix(name);
      if (ti.shape.size() == 3) (void)f.tensor<3>(name);
    }
    for (const auto& kv : f.metadata()) (void)f.metadata_value(kv.first);
  } catch (const tpa::Error&) {
  }
  return 0;
}
