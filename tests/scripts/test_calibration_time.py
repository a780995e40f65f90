"""``calibration_time.py --breakdown`` times the steps of a real GPTQ run through the
sequential driver (a lease's ``gptqprof`` stage reads these names), and puts the steps back
as they were."""

from __future__ import annotations

from ditq.methods import METHODS, RTNConfig
from ditq.pipeline import sequential
from ditq.pipeline.gptq_solver import GPTQSolver

from conftest import load_script, run_unpacked, tiny_dit


def test_breakdown_times_every_step_of_a_gptq_run(calib):
    script = load_script("benchmarks/calibration_time.py")
    model = tiny_dit(depth=2)
    run_unpacked(METHODS["rtn"], model, RTNConfig(wbits=4, abits=8), calib)
    originals = [getattr(owner, name) for owner, name in script.TIMED]
    with script.timed_steps("cpu") as steps:
        sequential.run_sequential(model, None, calib, GPTQSolver(), progress=False)
    calls = {name: count for name, (_, count) in steps.items()}
    assert calls == {
        "ditq.pipeline.sequential._capture": 1,  # block 0; block 1's inputs are carried
        "ditq.pipeline.sequential._outputs": 1,
        "UnitData.__init__": 2,
        "GPTQSolver._next_stage": 8,  # qkv, proj, fc1, fc2 in each block
        "GPTQSolver._hessian_pass": 8,
        "ditq.pipeline.gptq_solver.gptq_quantize": 8,
        "ditq.pipeline.gptq_solver._relative_error": 16,  # GPTQ's and RTN's
    }
    assert all(seconds > 0 for seconds, _ in steps.values())
    assert [getattr(owner, name) for owner, name in script.TIMED] == originals
