"""The four real-robot tasks of the SMP paper (Appendix B.1.2) as MuJoCo objects, stages and checks.

Each task contributes MJCF bodies, randomises their poses on reset from the world's seeded
generator, and scores progress with the paper's stages. A stage counts once it has been reached
after all earlier ones (``BimanualWorld`` tracks that), so progress never decreases.

All grasps are friction grasps between the two finger pads; the objects are sized so that a
top-down grasp fits the 0.07 m opening and lies in the arms' low top-down reach (see scene.py).

- pen_cap: a pen lying along y with a cap on its -y end, joined by a slide joint with dry
  friction (frictionloss), so the cap comes off only when pulled. "Removed" = slid 4 cm.
- cups_in_bowl: two 4 cm cubes (the "cups") left and right of a bowl in the middle.
- handover: a screwdriver (handle + shaft) lying along y in front of the left arm.
- pour_beans: an open cup with beans (small spheres) in front of the left arm, a bowl with a
  grasping tab in front of the right arm; success = at least half the beans in the bowl.
  Weld-on-grasp fallback: pouring tilts the cup about the fingers' closing axis, which only the
  pads' torsional friction resists, and MuJoCo's soft torsional friction lets the cup swing
  upright. So while the left fingers hold the cup (both pads touch it, gripper commanded closed)
  a weld constraint fixes the cup to the flange at its current relative pose; it is released as
  soon as the gripper is commanded open. Every other grasp is pure friction.
"""

from __future__ import annotations

import numpy as np

from smp_ros.config import TASK_OBJECTS, TASKS
from smp_ros.sim.scene import mat_to_quat

TABLE_Z = 0.0
LIFT_MIN = 0.03  # m above the resting height counts as "lifted"


def _free_body(name: str, pos, inner: str) -> str:
    return f'<body name="{name}" pos="{pos[0]} {pos[1]} {pos[2]}"><freejoint name="{name}_free"/>{inner}</body>'


def _bowl_geoms(radius: float, height: float, rgba: str, walls: int = 16) -> str:
    """A round bowl from a floor disc and a ring of wall boxes (MuJoCo has no concave primitives)."""
    geoms = [f'<geom class="object" type="cylinder" size="{radius + 0.005} 0.003" pos="0 0 0.003" rgba="{rgba}"/>']
    half_len = radius * np.tan(np.pi / walls) + 0.002
    for k in range(walls):
        a = 2 * np.pi * k / walls
        geoms.append(f'<geom class="object" type="box" size="0.003 {half_len:.4f} {height / 2}" '
                     f'pos="{radius * np.cos(a):.4f} {radius * np.sin(a):.4f} {height / 2}" '
                     f'euler="0 0 {a:.4f}" rgba="{rgba}"/>')
    return "".join(geoms)


class Task:
    name: str = ""
    n_stages: int = 4
    bodies: tuple[str, ...] = ()

    def objects_xml(self) -> tuple[str, str, str]:
        """(MJCF bodies, MJCF assets, MJCF top-level extras such as equality constraints)."""
        raise NotImplementedError

    def bind(self, world) -> None:
        m = world.model
        self.body_id = {name: m.body(name).id for name in self.bodies}
        self.rest_z = {}

    def body_ids(self, *names: str) -> set[int]:
        return {self.body_id[n] for n in names}

    def set_pose(self, world, body: str, pos, yaw: float = 0.0) -> None:
        jnt = world.model.body(body).jntadr[0]
        adr = world.model.jnt_qposadr[jnt]
        world.data.qpos[adr:adr + 3] = pos
        world.data.qpos[adr + 3:adr + 7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        world.data.qvel[world.model.jnt_dofadr[jnt]:world.model.jnt_dofadr[jnt] + 6] = 0.0
        self.rest_z[body] = float(pos[2])

    def pos(self, world, body: str) -> np.ndarray:
        return world.data.body(body).xpos.copy()

    def rot(self, world, body: str) -> np.ndarray:
        return world.data.body(body).xmat.reshape(3, 3).copy()

    def lifted(self, world, body: str, height: float = LIFT_MIN) -> bool:
        return self.pos(world, body)[2] > self.rest_z[body] + height

    def randomize(self, world, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def stage_reached(self, world, stage: int) -> bool:
        raise NotImplementedError

    def success(self, world) -> bool:
        return world.stage() >= self.n_stages

    def update(self, world) -> None:
        """Called once per ``world.step``; tasks with grasp-time constraints override it."""

    def state(self, world) -> dict:
        return {name: {"pos": self.pos(world, name).tolist()} for name in self.bodies}


class PenCap(Task):
    name = "pen_cap"
    bodies = ("pen", "cap")
    PEN_HALF = (0.011, 0.06, 0.011)
    CAP_HALF = (0.013, 0.025, 0.011)
    CAP_OFF = 0.04  # slide travel that counts as removed

    def objects_xml(self):
        px, py, pz = self.PEN_HALF
        cx, cy, cz = self.CAP_HALF
        cap = (f'<body name="cap" pos="0 {-py + cy - 0.02} 0">'
               f'<joint name="cap_slide" type="slide" axis="0 -1 0" range="0 0.08" frictionloss="1.5" damping="0.5"/>'
               f'<geom class="object" type="box" size="{cx} {cy} {cz}" mass="0.01" rgba="0.1 0.2 0.8 1"/></body>')
        inner = f'<geom class="object" type="box" size="{px} {py} {pz}" mass="0.03" rgba="0.9 0.9 0.2 1"/>' + cap
        return _free_body("pen", (0.22, 0.08, pz), inner), "", ""

    def bind(self, world):
        super().bind(world)
        self.slide_adr = world.model.joint("cap_slide").qposadr[0]

    def randomize(self, world, rng):
        pos = (0.21 + rng.uniform(-0.02, 0.02), 0.09 + rng.uniform(-0.02, 0.02), self.PEN_HALF[2])
        self.set_pose(world, "pen", pos, rng.uniform(-0.15, 0.15))
        world.data.qpos[self.slide_adr] = 0.0

    def cap_travel(self, world) -> float:
        return float(world.data.qpos[self.slide_adr])

    def stage_reached(self, world, stage):
        pen = self.body_ids("pen")
        if stage == 1:
            return world.grasping("left", pen)
        if stage == 2:
            return world.grasping("left", pen) and self.lifted(world, "pen")
        if stage == 3:
            return world.grasping("right", self.body_ids("cap")) and self.lifted(world, "pen")
        return self.cap_travel(world) >= self.CAP_OFF

    def state(self, world):
        out = super().state(world)
        out["cap_travel"] = self.cap_travel(world)
        return out


class CupsInBowl(Task):
    name = "cups_in_bowl"
    bodies = ("cup_left", "cup_right", "bowl")
    CUBE = 0.02  # half size
    BOWL_R, BOWL_H = 0.075, 0.035

    def objects_xml(self):
        def cube(rgba):
            return f'<geom class="object" type="box" size="{self.CUBE} {self.CUBE} {self.CUBE}" mass="0.05" rgba="{rgba}"/>'

        return ("".join([
            _free_body("cup_left", (0.2, 0.16, self.CUBE), cube("0.85 0.2 0.2 1")),
            _free_body("cup_right", (0.2, -0.16, self.CUBE), cube("0.2 0.7 0.3 1")),
            _free_body("bowl", (0.24, 0.0, 0.0),
                       _bowl_geoms(self.BOWL_R, self.BOWL_H, "0.9 0.9 0.95 1") +
                       '<inertial pos="0 0 0.01" mass="0.4" diaginertia="1e-3 1e-3 2e-3"/>'),
        ]), "", "")

    def randomize(self, world, rng):
        self.set_pose(world, "bowl", (0.24 + rng.uniform(-0.015, 0.015), rng.uniform(-0.015, 0.015), 0.0))
        for body, y in (("cup_left", 0.16), ("cup_right", -0.16)):
            self.set_pose(world, body, (0.2 + rng.uniform(-0.02, 0.02), y + rng.uniform(-0.02, 0.02), self.CUBE),
                          rng.uniform(-0.3, 0.3))

    def in_bowl(self, world, body: str) -> bool:
        rel = self.pos(world, body) - self.pos(world, "bowl")
        return bool(np.hypot(rel[0], rel[1]) < self.BOWL_R - 0.01 and rel[2] < self.BOWL_H)

    def stage_reached(self, world, stage):
        if stage == 1:
            return world.grasping("left", self.body_ids("cup_left")) and self.lifted(world, "cup_left")
        if stage == 2:
            return self.in_bowl(world, "cup_left") and not world.touching("left", self.body_ids("cup_left"))
        if stage == 3:
            return world.grasping("right", self.body_ids("cup_right")) and self.lifted(world, "cup_right")
        return self.in_bowl(world, "cup_right") and not world.touching("right", self.body_ids("cup_right"))

    def success(self, world):
        return world.stage() >= 4 and self.in_bowl(world, "cup_left") and self.in_bowl(world, "cup_right")


class Handover(Task):
    name = "handover"
    bodies = ("tool",)
    HANDLE_HALF = (0.014, 0.05, 0.014)
    SHAFT_HALF = (0.007, 0.05, 0.007)

    def objects_xml(self):
        hx, hy, hz = self.HANDLE_HALF
        sx, sy, sz = self.SHAFT_HALF
        inner = (f'<geom class="object" type="box" size="{hx} {hy} {hz}" mass="0.05" rgba="0.95 0.45 0.1 1"/>'
                 f'<geom class="object" type="box" size="{sx} {sy} {sz}" pos="0 {-hy - sy} {sz - hz}" mass="0.03" '
                 f'rgba="0.6 0.6 0.65 1"/>')
        return _free_body("tool", (0.21, 0.12, hz), inner), "", ""

    def randomize(self, world, rng):
        pos = (0.21 + rng.uniform(-0.02, 0.02), 0.12 + rng.uniform(-0.02, 0.02), self.HANDLE_HALF[2])
        self.set_pose(world, "tool", pos, rng.uniform(-0.2, 0.2))

    def stage_reached(self, world, stage):
        tool = self.body_ids("tool")
        if stage == 1:
            return world.grasping("left", tool)
        if stage == 2:
            return world.grasping("left", tool) and self.lifted(world, "tool")
        if stage == 3:
            return world.grasping("right", tool) and self.lifted(world, "tool")
        return (world.grasping("right", tool) and not world.touching("left", tool)
                and self.lifted(world, "tool", 0.02))


class PourBeans(Task):
    name = "pour_beans"
    n_stages = 5
    N_BEANS = 12
    BEAN_R = 0.0065
    CUP_HALF, CUP_H = 0.03, 0.05  # outer half width, wall height
    BOWL_R, BOWL_H = 0.07, 0.03
    SUCCESS_SHARE = 0.5

    @property
    def bodies(self):
        return ("cup", "bowl") + tuple(f"bean{i}" for i in range(self.N_BEANS))

    def objects_xml(self):
        # A scoop: three full walls and a low lip on the -x side, over which the beans pour when
        # the cup is tilted towards -x (a top-down grasp can tilt it ~70 deg, not past 90).
        w, h, t, lip = self.CUP_HALF, self.CUP_H, 0.003, 0.005
        cup = [f'<geom class="object" type="box" size="{w} {w} {t}" pos="0 0 {t}" rgba="0.2 0.5 0.9 1"/>']
        for x, y, sx, sy, hz in ((w - t, 0, t, w, h), (-w + t, 0, t, w, lip), (0, w - t, w, t, h), (0, -w + t, w, t, h)):
            cup.append(f'<geom class="object" type="box" size="{sx} {sy} {hz / 2}" pos="{x} {y} {hz / 2 + t}" '
                       f'rgba="0.2 0.5 0.9 1"/>')
        cup.append('<inertial pos="0 0 0.02" mass="0.06" diaginertia="3e-5 3e-5 3e-5"/>')
        bowl = (_bowl_geoms(self.BOWL_R, self.BOWL_H, "0.9 0.9 0.95 1") +
                f'<geom class="object" type="box" size="0.018 0.014 0.012" pos="0 {-self.BOWL_R - 0.016} 0.012" '
                f'rgba="0.5 0.5 0.55 1"/>'
                '<inertial pos="0 0 0.01" mass="0.08" diaginertia="2e-4 2e-4 4e-4"/>')
        beans = [_free_body(f"bean{i}", (0.2, 0.15, 0.02 + 0.014 * i),
                            f'<geom class="object" type="sphere" size="{self.BEAN_R}" mass="0.002" '
                            f'rgba="0.45 0.25 0.1 1"/>') for i in range(self.N_BEANS)]
        weld = '<equality><weld name="cup_weld" body1="left_flange" body2="cup" active="false"/></equality>'
        return (_free_body("cup", (0.2, 0.15, 0.0), "".join(cup)) + _free_body("bowl", (0.2, -0.15, 0.0), bowl)
                + "".join(beans)), "", weld

    def bind(self, world):
        super().bind(world)
        self.weld = world.model.equality("cup_weld").id

    def update(self, world):
        d = world.data
        closed = world.arms["left"].gripper_target() < 0.03
        if not d.eq_active[self.weld] and closed and world.grasping("left", self.body_ids("cup")):
            f, c = d.body("left_flange"), d.body("cup")
            Rf = f.xmat.reshape(3, 3)
            rel_R = Rf.T @ c.xmat.reshape(3, 3)
            world.model.eq_data[self.weld, 3:6] = Rf.T @ (c.xpos - f.xpos)
            world.model.eq_data[self.weld, 6:10] = mat_to_quat(rel_R)
            world.model.eq_data[self.weld, 10] = 1.0
            d.eq_active[self.weld] = 1
        elif d.eq_active[self.weld] and not closed:
            d.eq_active[self.weld] = 0

    def randomize(self, world, rng):
        cup = np.array([0.2 + rng.uniform(-0.015, 0.015), 0.15 + rng.uniform(-0.015, 0.015), 0.0])
        self.set_pose(world, "cup", cup)
        self.set_pose(world, "bowl", (0.21 + rng.uniform(-0.015, 0.015), -0.13 + rng.uniform(-0.015, 0.015), 0.0))
        # Beans on a 3 x 3 grid inside the scoop, a second layer on top; they settle during reset.
        for i in range(self.N_BEANS):
            cell, layer = i % 9, i // 9
            off = 0.0145 * np.array([cell % 3 - 1, cell // 3 - 1]) + 0.003
            self.set_pose(world, f"bean{i}", (cup[0] + off[0], cup[1] + off[1], 0.013 + 0.0135 * layer))
        for i in range(self.N_BEANS):
            self.rest_z[f"bean{i}"] = 0.0

    def beans_in_bowl(self, world) -> int:
        bowl = self.pos(world, "bowl")
        n = 0
        for i in range(self.N_BEANS):
            rel = self.pos(world, f"bean{i}") - bowl
            n += bool(np.hypot(rel[0], rel[1]) < self.BOWL_R and -0.005 < rel[2] < self.BOWL_H + 0.01)
        return n

    def near_centre(self, world, body: str) -> bool:
        return abs(self.pos(world, body)[1]) < 0.1

    def stage_reached(self, world, stage):
        cup, bowl = self.body_ids("cup"), self.body_ids("bowl")
        if stage == 1:
            return world.grasping("left", cup)
        if stage == 2:
            return world.grasping("left", cup) and self.lifted(world, "cup") and self.near_centre(world, "cup")
        if stage == 3:
            return world.grasping("right", bowl)
        if stage == 4:
            return world.grasping("right", bowl) and self.lifted(world, "bowl", 0.02) and self.near_centre(world, "bowl")
        return self.beans_in_bowl(world) >= self.SUCCESS_SHARE * self.N_BEANS

    def success(self, world):
        return world.stage() >= self.n_stages and self.beans_in_bowl(world) >= self.SUCCESS_SHARE * self.N_BEANS

    def state(self, world):
        out = {"cup": {"pos": self.pos(world, "cup").tolist()}, "bowl": {"pos": self.pos(world, "bowl").tolist()}}
        out["beans_in_bowl"] = self.beans_in_bowl(world)
        return out


TASK_CLASSES = {cls.name: cls for cls in (PenCap, CupsInBowl, Handover, PourBeans)}
assert tuple(TASK_CLASSES) == TASKS
# The tracked objects of each task (the object-pose observation, config.TASK_OBJECTS) are its bodies,
# beans excepted: a tracker follows the cup and the bowl, not a dozen 13 mm beans.
assert all(set(TASK_OBJECTS[t]) <= set(TASK_CLASSES[t]().bodies) for t in TASKS)


def make_task(name: str) -> Task:
    if name not in TASK_CLASSES:
        raise ValueError(f"task: unknown task {name!r}; expected one of {TASKS}")
    return TASK_CLASSES[name]()
