"""TEST DOUBLES for what cannot run on this project's machines (NVIDIA tools, a Jetson board).

Everything here is a fake and named as one; no test that uses them proves anything about
real TensorRT, torch-tensorrt or Jetson hardware, only about our code around them.
"""
