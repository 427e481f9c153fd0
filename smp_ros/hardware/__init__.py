"""Robot I/O without ROS: the arm interface, PiPER arms over piper_sdk, camera capture, image buffers."""
