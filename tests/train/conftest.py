import multiprocessing
import os

import pytest
import torch.distributed as dist

DEMO_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", "vlbert_demo.gin")


@pytest.fixture(scope="session")
def demo_recipe():
    return DEMO_RECIPE


@pytest.fixture(scope="session")
def full_demo_directory(tmp_path_factory):
    """A folder for the pre-training demo at its shipped size (4000 + 500 scenes), written by the
    first recipe that reads it and reused by the others (about 12 s per copy saved)."""
    return tmp_path_factory.mktemp("full_demo_data")


@pytest.fixture(scope="session")
def small_demo_bindings(tmp_path_factory):
    """The demo recipe shrunk for tests: 2 layers, hidden 64, 240 scenes, short schedule."""
    directory = tmp_path_factory.mktemp("demo_data")
    return [
        f"DemoScenes.directory = '{directory}'",
        "DemoScenes.train = 240",
        "DemoScenes.val = 64",
        "HIDDEN_SIZE = 64",
        "NUM_LAYERS = 2",
        "INTERMEDIATE_SIZE = 128",
        "FlattenRoIHead.out_channels = 64",
        "APPEARANCE_SIZE = 64",
        "demo/Trainer.total_steps = 30",
        "demo/Trainer.batch_size = 16",
        "demo/Trainer.text_batch_size = 8",
        "demo/Trainer.warmup_steps = 3",
        "demo/Trainer.log_every = 5",
        "demo/Trainer.eval_batches = 2",
    ]


def _gloo_process(work, rank, rendezvous, results, args):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        results.put((rank, work(rank, *args)))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def in_two_gloo_processes(tmp_path):
    """`run(work, *args)`: `work(rank, *args)` in two forked processes joined in a gloo group on
    the CPU; returns {rank: what `work` returned} (plain values: tensors do not outlive their process)."""

    def run(work, *args):
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        rendezvous = tmp_path / f"rendezvous-{len(list(tmp_path.glob('rendezvous-*')))}"
        children = [context.Process(target=_gloo_process, args=(work, rank, rendezvous, results, args)) for rank in range(2)]
        for child in children:
            child.start()
        try:
            gathered = dict(results.get(timeout=120) for _ in children)
        finally:  # a process left waiting in a collective for one that died must not outlive the test
            for child in children:
                child.join(timeout=60)
                if child.is_alive():
                    child.kill()
        assert [child.exitcode for child in children] == [0, 0]
        return gathered

    return run
