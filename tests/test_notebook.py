"""notebooks/quickstart.ipynb runs top to bottom and shows a head."""

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow


def test_quickstart_notebook_executes(repo_root):
    nb = nbformat.read(repo_root / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(repo_root / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "6 layers x 12 heads" in text and "144 layouts; failed: []" in text, text
    # Bokeh's notebook output: the last cell carries a rendered document.
    last = nb.cells[-1].outputs
    assert any("application/vnd.bokehjs_exec.v0+json" in o.get("data", {}) or "text/html" in o.get("data", {}) for o in last)
