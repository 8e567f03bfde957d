"""Model serving: an OpenAI-compatible server backed by a profile-paced simulated engine, and the
argv builders that let a serving job run either it (``festina serve --simulated``) or vLLM."""
