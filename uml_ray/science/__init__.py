"""Answers, not just runs: paired UML-vs-unimodal comparisons over seeds and the conversion study."""
