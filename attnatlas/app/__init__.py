"""The Bokeh dashboard, a directory app: `attnatlas serve ATLAS` or `bokeh serve attnatlas/app --args ATLAS`."""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
