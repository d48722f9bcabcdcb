"""Decoding: the `Stepper` protocol a language model implements, and the loops over it."""

from blip2.generation.decoding import generate
from blip2.generation.options import GenerationOptions
from blip2.generation.steppers import Stepper

__all__ = ["GenerationOptions", "Stepper", "generate"]
