import pytest

from vlblocks.data.synthetic_tasks import write_demo_task


@pytest.fixture(scope="session")
def demo_tasks(tmp_path_factory):
    """task name -> `DemoTaskPaths` of small demo fine-tuning datasets in the public layouts."""
    directory = tmp_path_factory.mktemp("demo_tasks")
    return {task: write_demo_task(task, directory, train=96, val=32) for task in ("vqa", "vcr", "refcoco")}
