"""The peers of the side-by-side benchmark: MLServer, PyTriton and a bare grpc.aio servicer.

Each peer serves `mlp64` (y = relu(x @ W), see `model.py`) from its own virtual environment
(`setup.sh`); `launch.py` starts, waits for and stops them. Modules here that peers import
(`model`, `model_config_wire`) depend on numpy alone, never on batchwire.
"""
