"""Measurement: peak memory and latency benches (`measure`), the GPU peak-memory simulator (`simulate`) and FLOP and
byte counting on fake tensors (`flops`). Uses the library; the library never imports it."""
