"""The body: the 24-joint skeleton and its forward kinematics, the SMPL model, the tracker's
cameras (`camera`), BVH export, and the overlays drawn on video (`render`, `render_gl`)."""
