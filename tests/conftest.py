import pytest
import torch

from vlblocks.data.demo.scenes import DemoScenes
from vlblocks.data.demo.task_data import write_demo_task

# Scenes per split of the demo task data the tests share; RefCOCO+ has enough to learn from.
DEMO_TASK_SIZES = {"vqa": (96, 32), "vcr": (96, 32), "refcoco": (800, 200)}


@pytest.fixture(scope="session")
def demo_tasks(tmp_path_factory):
    """task name -> `DemoTaskPaths` of small demo fine-tuning datasets in the public layouts
    (sizes in `DEMO_TASK_SIZES`)."""
    directory = tmp_path_factory.mktemp("demo_tasks")
    return {task: write_demo_task(task, DemoScenes(str(directory), *sizes)) for task, sizes in DEMO_TASK_SIZES.items()}



@pytest.fixture(scope="session")
def randomised():
    """`randomised(model, seed=0)`: every parameter of `model` drawn at random (a tied one once,
    through the shared tensor; LayerNorm weights around 1), and the model in eval mode, so that
    converted weights are compared on values no initialisation would give."""

    def randomise(model, seed=0):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                values = torch.randn(parameter.shape, generator=generator) * 0.1
                parameter.copy_(values + 1 if "LayerNorm.weight" in name else values)
        return model.eval()

    return randomise
