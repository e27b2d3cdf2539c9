from kernelplane import override_hardware, probe_hardware
from kernelplane.hardware import _probe_cached


def test_probe_is_cached_and_describes_itself():
    assert _probe_cached() is _probe_cached()
    hw = probe_hardware()
    assert hw.device_type in ("cpu", "cuda", "rocm")
    assert hw.torch_version and "torch" in hw.describe()


def test_cpu_never_claims_compiled_triton(monkeypatch):
    from kernelplane.hardware import _probe

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hw = _probe()
    assert hw.device_type == "cpu" and hw.triton_mode == "unavailable"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _probe().triton_mode == ("interpreter" if hw.triton_version else "unavailable")


def test_override_nests_and_restores():
    real = probe_hardware()
    with override_hardware(device_type="cuda", device_name="NVIDIA H100", compute_capability=(9, 0)) as hw:
        assert probe_hardware() is hw and hw.compute_capability == (9, 0)
        with override_hardware(device_type="rocm"):
            assert probe_hardware().device_type == "rocm"
        assert probe_hardware().device_name == "NVIDIA H100"
    assert probe_hardware() == real


def test_cpu_device_on_a_gpu_machine_sees_cpu_facts():
    from kernelplane.hardware import hardware_for_device

    with override_hardware(device_type="cuda", device_name="NVIDIA H100", compute_capability=(9, 0),
                           triton_version="3.6.0", triton_mode="compiled") as gpu:
        assert hardware_for_device("cuda") == gpu
        cpu = hardware_for_device("cpu")
        assert cpu.device_type == "cpu" and cpu.compute_capability is None
        # Triton kernels must not be chosen for tensors that live on the CPU.
        assert cpu.triton_mode != "compiled"
