// Entry point of the Python extension drsl_fast._C. Importing it loads this
// shared library, which runs the static operator registrations of the other
// translation units; the module itself defines no Python functions.
// (CMakeLists.txt builds the operators without this file, for C++ users.)
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
