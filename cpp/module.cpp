// nrcore._C: compiled kernels. Bindings take raw pointers, shapes and dtypes (no libtorch).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
    m.doc() = "nrcore compiled core";
    m.attr("has_cuda") = false;
}
