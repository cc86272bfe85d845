"""Synthetic multiplex immunofluorescence slides with ground truth (test oracle, training set)."""

from .cells import CELL_TYPES, MARKERS
from .cohort import synth_cohort
from .condition import SlideCondition
from .slide import synth_slide
from .style import STYLES, SlideStyle
from .truth import SlideTruth, load_truth, render_truth_labels

__all__ = ["CELL_TYPES", "MARKERS", "STYLES", "SlideCondition", "SlideStyle", "SlideTruth", "load_truth", "render_truth_labels",
           "synth_cohort", "synth_slide"]
