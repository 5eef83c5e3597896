"""Exceptions raised by ecif_fast. All derive from the built-in type a caller would expect."""


class ECIFInputError(ValueError):
    """Bad input: wrong shape, non-finite values, empty data, mismatched lengths, bad option."""


class NotPositiveDefiniteError(ValueError):
    """The damped curvature matrix is not positive definite, so ``H^{-1}`` does not exist."""


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly (``backend=`` or ``ECIF_FAST_BACKEND``) but cannot be used."""
