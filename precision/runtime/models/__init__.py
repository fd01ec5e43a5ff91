"""The model to run: loading a checkpoint as the right class, dtype policies (modules kept in
fp32) and the inputs it is fed."""
