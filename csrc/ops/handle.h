// How C++ in torchnorm calls a torchnorm op (an autograd Function calls its op,
// a composite op the ops it is built from): through the dispatcher, so each
// call reaches the kernel of its tensors' device, with a typed handle that is
// looked up once. The ops themselves are declared in the other headers of
// this folder, one per op family; their schemas live in csrc/registration.cpp.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchnorm::ops {

// The typed handle of Op, one of the structs in csrc/ops/*.h: Op::kName is
// the op's qualified name, Op::Signature its C++ signature. Looked up at the
// first call (after the library has registered its schemas) and kept.
// typed<>() checks Signature against the C++ signature of the op's
// registered kernels: a mismatch throws at that first call.
template <typename Op>
const c10::TypedOperatorHandle<typename Op::Signature>& handle() {
  static const auto typed =
      c10::Dispatcher::singleton().findSchemaOrThrow(Op::kName, "").template typed<typename Op::Signature>();
  return typed;
}

}  // namespace torchnorm::ops
