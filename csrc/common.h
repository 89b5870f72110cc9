// Helpers shared by the C++ CPU kernels: typed views of numpy buffers and a
// deterministic parallel loop. Tensors arrive from Python as C-contiguous numpy
// arrays (torch.Tensor.numpy(), no copy); the Python layer allocates outputs.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace kpfast {

// A C-contiguous buffer of T with its shape, checked against what the caller expects.
template <typename T>
T* data_of(const py::array& a, const char* name, std::vector<int64_t> shape) {
  if (!py::isinstance<py::array_t<T>>(a)) {
    throw std::invalid_argument(std::string(name) + ": unexpected dtype");
  }
  if (!(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) + ": must be C-contiguous");
  }
  if (static_cast<size_t>(a.ndim()) != shape.size()) {
    throw std::invalid_argument(std::string(name) + ": unexpected rank");
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    if (a.shape(i) != shape[i]) {
      throw std::invalid_argument(std::string(name) + ": unexpected shape in dimension " + std::to_string(i));
    }
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// nullptr for None, else data_of.
template <typename T>
T* optional_data_of(const py::object& o, const char* name, std::vector<int64_t> shape) {
  if (o.is_none()) return nullptr;
  return data_of<T>(o.cast<py::array>(), name, std::move(shape));
}

// Run body(i) for i in [0, n) on up to `threads` OpenMP threads. Each index is
// processed by exactly one thread, so results written per index are
// independent of the thread count.
template <typename F>
void parallel_for(int64_t n, int threads, F&& body) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// Calls f(T()) with T = double when `a` holds float64 and T = float otherwise: the one place where
// a binding picks the instantiation of its typed kernel (`using T = decltype(zero);` in f).
template <typename F>
void with_float_type(const py::array& a, F&& f) {
  if (py::isinstance<py::array_t<double>>(a)) {
    f(double());
  } else {
    f(float());
  }
}

template <typename T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

}  // namespace kpfast
