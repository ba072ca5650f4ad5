import os

# Triton kernels run under the interpreter wherever there is no GPU. This must be set before
# triton is first imported, so it lives at the root of the test session.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
