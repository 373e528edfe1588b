"""The torchvision compatibility step: applied only when needed, and it makes timm usable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_timm_imports_and_builds_models_after_the_step():
    result = _run(
        """
        import torch
        from sthisto import _compat
        first = _compat.ensure_torchvision()
        timm = _compat.import_timm()
        model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
        out = model(torch.zeros(1, 3, 32, 32))
        assert out.shape == (1, 3)
        assert _compat.ensure_torchvision() is False  # idempotent
        print("applied" if first else "not-needed")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"applied", "not-needed"}


def test_step_is_a_no_op_when_native_operators_load():
    result = _run(
        """
        from sthisto import _compat
        _compat._native_ops_load = lambda package_dir: True
        assert _compat.ensure_torchvision() is False
        assert _compat._fallback_library is None
        """
    )
    assert result.returncode == 0, result.stderr


def test_step_is_a_no_op_once_torchvision_is_imported():
    result = _run(
        """
        import sys, types
        sys.modules["torchvision"] = types.ModuleType("torchvision")
        from sthisto import _compat
        assert _compat.ensure_torchvision() is False
        assert _compat._fallback_library is None
        """
    )
    assert result.returncode == 0, result.stderr


def test_import_sthisto_stays_light():
    result = _run(
        """
        import sys
        import sthisto, sthisto.pp, sthisto.tl, sthisto.io, sthisto.pl, sthisto.models, sthisto.datasets
        heavy = [m for m in ("torch", "lightning", "timm", "torch_geometric", "torchvision") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    assert result.returncode == 0, result.stderr


def test_import_sthisto_does_not_look_up_its_version_in_the_metadata():
    # importlib.metadata scans every installed distribution: most of import time before.
    result = _run(
        """
        import sys
        import sthisto
        assert "importlib.metadata" not in sys.modules
        version = sthisto.__version__
        assert isinstance(version, str) and version[0].isdigit(), version
        from sthisto import __version__
        assert __version__ == version
        """
    )
    assert result.returncode == 0, result.stderr


def test_version_falls_back_to_the_metadata_in_a_source_tree_without_version_file():
    result = _run(
        """
        import sys
        sys.modules["sthisto._version"] = None  # as if _version.py were never written
        import sthisto
        assert "importlib.metadata" not in sys.modules
        assert isinstance(sthisto.__version__, str) and sthisto.__version__
        assert "importlib.metadata" in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr


def test_a_users_own_import_of_timm_works_after_import_sthisto():
    # Beside CPU torch a CUDA torchvision wheel fails on import until the step has run; the
    # finder installed by `import sthisto` runs it on the first torchvision import, not before.
    result = _run(
        """
        import sys
        import sthisto
        assert "torch" not in sys.modules
        import timm
        import torchvision
        assert not any(type(f).__name__ == "_TorchvisionImportHook" for f in sys.meta_path)
        import lightning
        """
    )
    assert result.returncode == 0, result.stderr
