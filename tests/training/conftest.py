"""Registers tests/training/instruction_fixtures.py as the module
`instructrec_test_instruction_fixtures`, once, before the test files import it: pytest runs with
--import-mode=importlib, so a test file cannot import a neighbouring helper file by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "instructrec_test_instruction_fixtures"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("instruction_fixtures.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
