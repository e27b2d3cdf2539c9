import socket
import threading
import time

import httpx
import pytest
import uvicorn

from kernelplane.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kernelplane.models import load_model
from kernelplane.server.app import create_app


@pytest.fixture(scope="session")
def smollm():
    return load_model("default", progress=False)


class RunningServer:
    def __init__(self, app, engine):
        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("test server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


def start_server(smollm, api_key=None, **config):
    engine = AsyncLLMEngine(engine=LLMEngine(EngineConfig(model="default", max_model_len=512, **config), loaded=smollm))
    engine.start()
    return RunningServer(create_app(engine, served_model_name="smollm2", api_key=api_key), engine)


@pytest.fixture(scope="module")
def server(smollm):
    s = start_server(smollm, max_num_seqs=4)
    yield s
    s.stop()
