"""Camera node: one per camera, run in namespace /cameras/<name>.

Publishes ``image_raw`` (sensor_msgs/Image, rgb8, sensor QoS) and ``camera_info`` at up to ``fps``,
stamped with the capture time. Capture runs in ``smp_ros.hardware.camera``'s grab thread, which
keeps only the newest frame, and publication is best effort: a slow subscriber costs dropped
frames, never a stalled camera.
"""

from __future__ import annotations

from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from smp_ros.config import ConfigError
from smp_ros.hardware.camera import Camera
from smp_ros.nodes.image_msgs import camera_info, rgb_to_msg
from smp_ros.ros_params import ParamSpec
from smp_ros.nodes.ros_util import SENSOR_QOS, GuardedNode, declare, run, to_stamp

CAMERA_SPECS = [
    ParamSpec("source", "0", "device index (0), device path (/dev/video2) or video file"),
    ParamSpec("width", 640, "frame width (px); frames are resized when the device ignores it"),
    ParamSpec("height", 480, "frame height (px)"),
    ParamSpec("fps", 30.0, "frames per second requested and published"),
    ParamSpec("fovy_deg", 60.0, "vertical field of view for camera_info (deg); calibrate for real use"),
    ParamSpec("frame_id", "", "header frame id; defaults to the camera's name (the namespace's last part)"),
    ParamSpec("realtime", False, "pace a video file at fps instead of reading it as fast as possible"),
]


class CameraNode(GuardedNode, Node):
    def __init__(self, **kwargs) -> None:
        self.camera: Camera | None = None  # destroy_node() also runs on a node that failed to start
        super().__init__("camera", **kwargs)
        p = declare(self, CAMERA_SPECS)
        name = self.get_namespace().rstrip("/").rsplit("/", 1)[-1] or "camera"
        for key in ("width", "height", "fps", "fovy_deg"):
            if not p[key] > 0:
                raise ConfigError(f"parameter {key}: expected > 0, got {p[key]!r}")
        source = int(p["source"]) if p["source"].isdigit() else p["source"]
        self.frame_id = p["frame_id"] or name
        self.fovy = p["fovy_deg"]
        self.camera = Camera(source, p["width"], p["height"], p["fps"], name=name, realtime=p["realtime"]).start()
        self.image_pub = self.create_publisher(Image, "image_raw", SENSOR_QOS)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", SENSOR_QOS)
        self._index = -1
        self._ended_logged = False
        # Poll at twice the frame rate so a frame waits at most half a period before it is published.
        self.timer = self.create_timer(0.5 / p["fps"], self._publish_newest)
        self.get_logger().info(f"camera {name}: source {source!r}, {p['width']}x{p['height']} at {p['fps']:g} fps")

    def _publish_newest(self) -> None:
        frame = self.camera.latest(newer_than=self._index, timeout=0.0)
        if frame is None:
            if self.camera.ended and not self._ended_logged:
                self.get_logger().error(f"camera source {self.camera.source!r} stopped delivering frames")
                self._ended_logged = True
            return
        self._index = frame.index
        stamp = to_stamp(frame.stamp)
        self.image_pub.publish(rgb_to_msg(frame.image, stamp, self.frame_id))
        height, width = frame.image.shape[:2]
        self.info_pub.publish(camera_info(stamp, self.frame_id, height, width, self.fovy))

    def destroy_node(self) -> None:
        if self.camera is not None:
            self.camera.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run(CameraNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
