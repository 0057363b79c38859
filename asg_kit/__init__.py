"""asg-kit: the reference toolkit for self-evolving unified multimodal models
(Ask, Solve, Generate)."""

__version__ = "0.1.0"
