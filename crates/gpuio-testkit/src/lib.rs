//! Test support for gpu-io (filled in by the reliability work).
