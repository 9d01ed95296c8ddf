"""brain-gen's model zoo (seed 004) beyond the tokenizers: classifiers, ..."""
