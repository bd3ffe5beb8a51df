// Scores CompactRec's AOTInductor package (`compactrec export CONFIG --format aoti`) from C++, no Python.
//
//   aoti_score PACKAGE.pt2 DIR BATCH [LIBRARY.so ...]
//
// dlopens every LIBRARY (fbgemm_gpu's operator libraries, then CompactRec's: trainer.serve.aoti.operator_libraries()
// lists them) so the custom operators the package calls are registered, loads the package with
// torch::inductor::AOTIModelPackageLoader, reads the program's inputs from raw little-endian files in DIR
//   dense.f32   float32 [BATCH, 13]
//   values.i64  int64   [N]              raw ids, feature-major
//   lengths.i32 int32   [F * BATCH]      ids per (feature, sample), feature-major
// and writes the logits, float32 [BATCH], to DIR/logits.f32. A failed check in the package (a bad id or bad
// lengths) or any other error: a message on stderr, exit status 1, and no logits file.
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

constexpr int64_t kDense = 13;

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

at::Tensor tensor_from(const std::string& path, at::ScalarType dtype) {
  std::vector<char> bytes = read_file(path);
  const int64_t size = static_cast<int64_t>(c10::elementSize(dtype));
  if (static_cast<int64_t>(bytes.size()) % size != 0) throw std::runtime_error(path + ": size is not whole elements");
  at::Tensor out = at::empty({static_cast<int64_t>(bytes.size()) / size}, at::TensorOptions().dtype(dtype));
  if (!bytes.empty()) std::memcpy(out.data_ptr(), bytes.data(), bytes.size());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: aoti_score PACKAGE.pt2 DIR BATCH [LIBRARY.so ...]\n";
    return 2;
  }
  const std::string package = argv[1], dir = argv[2];
  const int64_t batch = std::stoll(argv[3]);
  for (int i = 4; i < argc; ++i) {
    if (dlopen(argv[i], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::cerr << "aoti_score: cannot load " << argv[i] << ": " << dlerror() << "\n";
      return 1;
    }
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(package);
    auto metadata = loader.get_metadata();
    if (metadata.find("compactrec") == metadata.end()) throw std::runtime_error(package + ": no compactrec metadata");
    at::Tensor dense = tensor_from(dir + "/dense.f32", at::kFloat);
    if (dense.numel() != batch * kDense) throw std::runtime_error("dense.f32 is not BATCH x 13 float32");
    std::vector<at::Tensor> inputs = {dense.view({batch, kDense}), tensor_from(dir + "/values.i64", at::kLong),
                                      tensor_from(dir + "/lengths.i32", at::kInt)};
    std::vector<at::Tensor> outputs = loader.run(inputs);
    at::Tensor logits = outputs.at(0).contiguous().to(at::kFloat);
    if (logits.numel() != batch) throw std::runtime_error("the package returned " + std::to_string(logits.numel()) +
                                                          " logits for a batch of " + std::to_string(batch));
    const std::string out_path = dir + "/logits.f32", tmp = out_path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary);
      out.write(static_cast<const char*>(logits.data_ptr()), static_cast<std::streamsize>(logits.nbytes()));
      if (!out) throw std::runtime_error("cannot write " + tmp);
    }
    if (std::rename(tmp.c_str(), out_path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp);
    std::cout << "aoti_score: " << batch << " logits written to " << out_path << "\n";
  } catch (const std::exception& exc) {
    std::cerr << "aoti_score: " << exc.what() << "\n";
    return 1;
  }
  return 0;
}
