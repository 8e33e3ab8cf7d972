import pytest

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

