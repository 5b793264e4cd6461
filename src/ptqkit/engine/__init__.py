"""Tier 7: the recipe, the per-layer plan it resolves to on a model (`targets`), the quantize
driver (`quantize`) and its weight-residency strategies (`onloading`, `memory_plan`)."""
