"""Example kernelplane plugin: paged attention through torch SDPA."""
