// The kpfast._C extension module: one register_* function per op file.
#include "common.h"

namespace kpfast {
void register_edge_map(py::module_& m);
void register_soft_argmax(py::module_& m);
void register_umeyama(py::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kpfast C++ CPU kernels (buffers in, buffers out; see kpfast/ops for the torch side)";
  kpfast::register_edge_map(m);
  kpfast::register_soft_argmax(m);
  kpfast::register_umeyama(m);
}
