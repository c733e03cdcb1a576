"""Composable training objectives: `core` (Objective, Term, Combiner), `teacher` (the EMA
teacher and feature queue shared by objectives)."""
from vlp_jax.objectives.core import (Combiner, FnObjective, LazyOutputs, Objective,
                                     ObjectiveInput, Term, override_terms, parse_terms,
                                     weight_schedule)
from vlp_jax.objectives.teacher import EmaTeacher, FeatureQueue, ema_update, select_params

__all__ = ["Combiner", "FnObjective", "LazyOutputs", "override_terms", "Objective",
           "ObjectiveInput", "Term", "parse_terms", "weight_schedule", "EmaTeacher", "FeatureQueue", "ema_update", "select_params"]
