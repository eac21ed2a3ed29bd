"""Tools around the runtime (not stages of the data path): the default model
(`models.py`), the one launcher of vLLM's OpenAI server and the sidecar (`launch.py`), the
end-to-end demo (`demo.py`), the synthetic replay client (`replay.py`), fuzzing and soak,
and small helpers shared by tools, benchmarks and tests (`net.py`)."""
