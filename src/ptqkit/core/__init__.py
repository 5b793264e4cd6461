"""Tier 0: what every other tier stands on. Errors, number formats (`qtypes`), quantization specs
and their parameters (`spec`), the quantize/dequantize maths (`primitives`), and small services
(threads, progress, machine description, atomic file writes). Imports nothing else of ptqkit."""
