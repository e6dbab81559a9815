// The CPU kernels compiled for the baseline ISA of the build (always available).
#include "cpu_kernels_impl.h"

namespace agf {

const KernelTable& cpu_kernels_baseline() {
  static const KernelTable table = make_table("baseline");
  return table;
}

}  // namespace agf
