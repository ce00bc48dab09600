"""Benchmarks: the workloads ``diffusekit bench`` and ``benchmarks/`` measure (:mod:`.workloads`), the timing
helpers (:mod:`.timing`) and the side-by-side harness against the reference (:mod:`.harness`). The top layer:
nothing in the library imports it."""
