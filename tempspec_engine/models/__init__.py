"""Model code: the Llama-family transformer, loaders and derived drafts."""
