"""Everything about the diffusion teacher: loading SD-family pipelines and solving their ODE."""

from .loading import SCHEDULERS, SUPPORTED_PIPELINES, Teacher, load_teacher, set_scheduler
from .ode import solve_ode

__all__ = ["SCHEDULERS", "SUPPORTED_PIPELINES", "Teacher", "load_teacher", "set_scheduler", "solve_ode"]
