"""Hand-written kernels on the emulator (INT8 GEMM, MLA, MoE dispatch/combine).

Nothing is built here yet: the kernels arrive with the INT8 GEMM, MLA and MoE issues.
"""
