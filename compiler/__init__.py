"""ptcompile: a post-training knowledge base that compiles itself into training scripts and a site."""

__version__ = "0.1.0"
