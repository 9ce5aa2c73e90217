import pathlib
import tempfile

FLASHINFER_WORKSPACE_DIR = (
    pathlib.Path(tempfile.gettempdir()) / "warmplan-fake-flashinfer" / "0.0.0" / "120"
)
