"""uml-ray: train and tune Unpaired Multimodal Learners on Ray, tracked in MLflow."""

__version__ = "0.1.0"
