"""DeepSeek MoE over expert parallelism (issue 6): routing, placement, FusedDispatch / FusedCombine over
AIV-Direct (and SDMA), the expert MLPs and the whole MoE sublayer. Import from the submodules."""
