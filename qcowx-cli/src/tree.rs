//! `qcowx tree`: the lineage forest of an image's VDIs and snapshots, as text,
//! JSON, Graphviz DOT or SVG.
//!
//! The forest reads top-down: a VDI, under it its snapshots, under each snapshot
//! the VDIs forked from it, and so on. Where each root hangs:
//! - a VDI under the snapshot it was forked from: the first snapshot of another VDI
//!   met going up its lineage (`qcowx list`'s `parent`, then that root's parent, ...;
//!   a revert to one of its own snapshots keeps the VDI where it was); a VDI not
//!   forked from another's snapshot (the default VDI, one QEMU made) starts a tree;
//! - a snapshot under its VDI; a snapshot whose VDI was deleted under its lineage
//!   parent, else it starts a tree.
//!
//! Children and trees are in time order (the default VDI, which has no date, first).

use std::collections::HashMap;
use std::io::{self, Write};

use qcowx_core::vdi::usage::RootUsage;
use qcowx_core::{RootInfo, RootKind};
use serde_json::{json, Value};

use qcowx_core::size::size_to_str;

/// One root in the forest.
#[derive(Debug, Clone)]
pub struct Node {
    /// The root as `list` reports it.
    pub info: RootInfo,
    /// Its space accounting.
    pub mapped: u64,
    /// Bytes only it references.
    pub exclusive: u64,
    /// The node it hangs off.
    pub up: Option<usize>,
    /// The nodes hanging off it, in time order.
    pub children: Vec<usize>,
}

/// The forest: nodes in `list` order and the indices of the trees' roots.
#[derive(Debug, Clone)]
pub struct Forest {
    /// Every live root.
    pub nodes: Vec<Node>,
    /// Nodes that hang off nothing, in time order.
    pub tops: Vec<usize>,
}

impl Forest {
    /// Builds the forest from `list` and `root_usage` (same order).
    pub fn build(roots: &[RootInfo], usage: &[RootUsage]) -> Forest {
        let by_uid: HashMap<u64, &RootUsage> = usage.iter().map(|u| (u.uid, u)).collect();
        let mut nodes: Vec<Node> = roots
            .iter()
            .map(|r| {
                let u = by_uid.get(&r.uid);
                Node {
                    info: r.clone(),
                    mapped: u.map_or(0, |u| u.mapped_bytes),
                    exclusive: u.map_or(0, |u| u.exclusive_bytes),
                    up: None,
                    children: Vec::new(),
                }
            })
            .collect();
        let index: HashMap<&str, usize> = roots
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let snapshot_named = |name: &Option<String>| -> Option<usize> {
            name.as_deref()
                .and_then(|n| index.get(n).copied())
                .filter(|&i| roots[i].kind == RootKind::Snapshot)
        };
        // Order of time; ties by list order.
        let key = |i: usize| (roots[i].created_ns, i);
        let vdi_named = |name: &str| -> Option<usize> {
            index
                .get(name)
                .copied()
                .filter(|&i| roots[i].kind == RootKind::Vdi)
        };
        // The snapshot VDI `i` was forked from: up its lineage, the first snapshot of
        // another VDI (bounded: a damaged lineage may loop).
        let origin = |i: usize| -> Option<usize> {
            let mut at = snapshot_named(&roots[i].parent);
            for _ in 0..roots.len() {
                let s = at?;
                if roots[s].vdi != roots[i].name {
                    return Some(s);
                }
                at = snapshot_named(&roots[s].parent);
            }
            None
        };
        for i in 0..roots.len() {
            let r = &roots[i];
            let up = match r.kind {
                RootKind::Vdi => origin(i),
                RootKind::Snapshot => vdi_named(&r.vdi).or_else(|| snapshot_named(&r.parent)),
            };
            nodes[i].up = up.filter(|&u| u != i);
        }
        // Break any cycle (damaged lineage): a node whose ancestors lead back to it
        // starts a tree.
        for i in 0..nodes.len() {
            let mut seen = vec![false; nodes.len()];
            let mut at = i;
            seen[i] = true;
            while let Some(u) = nodes[at].up {
                if seen[u] {
                    nodes[i].up = None;
                    break;
                }
                seen[u] = true;
                at = u;
            }
        }
        let mut tops = Vec::new();
        for i in 0..nodes.len() {
            match nodes[i].up {
                Some(u) => nodes[u].children.push(i),
                None => tops.push(i),
            }
        }
        for n in &mut nodes {
            n.children.sort_by_key(|&c| key(c));
        }
        tops.sort_by_key(|&c| key(c));
        Forest { nodes, tops }
    }

    /// Every node, parents before children, trees in time order.
    pub fn preorder(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<usize> = self.tops.iter().rev().copied().collect();
        while let Some(i) = stack.pop() {
            out.push(i);
            stack.extend(self.nodes[i].children.iter().rev());
        }
        out
    }
}

fn kind_name(k: RootKind) -> &'static str {
    match k {
        RootKind::Vdi => "vdi",
        RootKind::Snapshot => "snapshot",
    }
}

fn describe(n: &Node) -> String {
    match n.info.kind {
        RootKind::Snapshot => format!(
            "snapshot of {}, {} mapped, {} exclusive",
            n.info.vdi,
            size_to_str(n.mapped),
            size_to_str(n.exclusive)
        ),
        RootKind::Vdi => format!(
            "VDI, {} mapped, {} exclusive",
            size_to_str(n.mapped),
            size_to_str(n.exclusive)
        ),
    }
}

/// The human tree: one root per line, each under the root it hangs off.
pub fn human(out: &mut dyn Write, f: &Forest) -> io::Result<()> {
    fn node(out: &mut dyn Write, f: &Forest, i: usize, lead: &str, rest: &str) -> io::Result<()> {
        let n = &f.nodes[i];
        writeln!(out, "{lead}{}  ({})", n.info.name, describe(n))?;
        for (k, &c) in n.children.iter().enumerate() {
            let (head, more) = if k + 1 == n.children.len() {
                ("└─ ", "   ")
            } else {
                ("├─ ", "│  ")
            };
            node(
                out,
                f,
                c,
                &format!("{rest}{head}"),
                &format!("{rest}{more}"),
            )?;
        }
        Ok(())
    }
    for &t in &f.tops {
        node(out, f, t, "", "")?;
    }
    Ok(())
}

/// `qcowx tree --output=json`'s object (see `spec/cli-json.md`).
pub fn json(filename: &str, f: &Forest) -> Value {
    let nodes: Vec<Value> = f
        .preorder()
        .into_iter()
        .map(|i| {
            let n = &f.nodes[i];
            json!({
                "name": n.info.name,
                "kind": kind_name(n.info.kind),
                "uid": format!("{:x}", n.info.uid),
                "vdi": n.info.vdi,
                "parent": n.info.parent,
                "tree-parent": n.up.map(|u| f.nodes[u].info.name.clone()),
                "children": n.children.iter().map(|&c| f.nodes[c].info.name.clone()).collect::<Vec<_>>(),
                "date-sec": n.info.created_ns / 1_000_000_000,
                "date-nsec": n.info.created_ns % 1_000_000_000,
                "virtual-size": n.info.size,
                "mapped-bytes": n.mapped,
                "exclusive-bytes": n.exclusive,
            })
        })
        .collect();
    json!({ "filename": filename, "nodes": nodes })
}

/// A DOT quoted string.
fn dot_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The forest as a Graphviz digraph: one node per root (snapshots as ellipses, VDI
/// heads as bold boxes), one edge from each root to each root hanging off it.
pub fn dot(f: &Forest) -> String {
    let mut s =
        String::from("digraph qcowx {\n    rankdir=LR;\n    node [fontname=\"Helvetica\"];\n");
    for i in f.preorder() {
        let n = &f.nodes[i];
        let (shape, style) = match n.info.kind {
            RootKind::Snapshot => ("ellipse", "solid"),
            RootKind::Vdi => ("box", "bold"),
        };
        let label = format!(
            "{}\n{}\n{} exclusive",
            n.info.name,
            match n.info.kind {
                RootKind::Snapshot => format!("snapshot of {}", n.info.vdi),
                RootKind::Vdi => "VDI".to_string(),
            },
            size_to_str(n.exclusive)
        );
        s.push_str(&format!(
            "    {} [shape={shape}, style={style}, label={}];\n",
            dot_quote(&n.info.name),
            dot_quote(&label)
        ));
    }
    for i in f.preorder() {
        for &c in &f.nodes[i].children {
            s.push_str(&format!(
                "    {} -> {};\n",
                dot_quote(&f.nodes[i].info.name),
                dot_quote(&f.nodes[c].info.name)
            ));
        }
    }
    s.push_str("}\n");
    s
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A small SVG picture of the forest, without Graphviz: trees laid out left to
/// right, each node in a column by its depth and a row by the order of the leaves.
pub fn svg(f: &Forest) -> String {
    const COL: f64 = 220.0;
    const ROW: f64 = 64.0;
    const W: f64 = 190.0;
    const H: f64 = 44.0;
    const PAD: f64 = 20.0;
    let n = f.nodes.len();
    let mut depth = vec![0usize; n];
    let mut row = vec![0f64; n];
    let mut next_row = 0f64;
    // Post-order placement: leaves take the next row, parents sit at their
    // children's mean row.
    fn place(
        f: &Forest,
        i: usize,
        d: usize,
        depth: &mut [usize],
        row: &mut [f64],
        next_row: &mut f64,
    ) {
        depth[i] = d;
        let kids = &f.nodes[i].children;
        if kids.is_empty() {
            row[i] = *next_row;
            *next_row += 1.0;
            return;
        }
        for &c in kids {
            place(f, c, d + 1, depth, row, next_row);
        }
        row[i] = kids.iter().map(|&c| row[c]).sum::<f64>() / kids.len() as f64;
    }
    for &t in &f.tops {
        place(f, t, 0, &mut depth, &mut row, &mut next_row);
    }
    let max_depth = depth.iter().copied().max().unwrap_or(0) as f64;
    let width = PAD * 2.0 + max_depth * COL + W;
    let height = PAD * 2.0 + (next_row - 1.0).max(0.0) * ROW + H;
    let pos = |i: usize| (PAD + depth[i] as f64 * COL, PAD + row[i] * ROW);
    let mut s = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" \
         font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n<title>qcowx tree</title>\n"
    );
    for i in 0..n {
        for &c in &f.nodes[i].children {
            let (x1, y1) = pos(i);
            let (x2, y2) = pos(c);
            s.push_str(&format!(
                "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#555\"/>\n",
                x1 + W,
                y1 + H / 2.0,
                x2,
                y2 + H / 2.0
            ));
        }
    }
    for i in 0..n {
        let node = &f.nodes[i];
        let (x, y) = pos(i);
        let (rx, stroke_width, fill) = match node.info.kind {
            RootKind::Snapshot => (H / 2.0, 1.0, "#eef3fb"),
            RootKind::Vdi => (4.0, 2.5, "#fdf3e1"),
        };
        s.push_str(&format!(
            "<g class=\"{}\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{W}\" height=\"{H}\" rx=\"{rx:.1}\" \
             fill=\"{fill}\" stroke=\"#333\" stroke-width=\"{stroke_width}\"/>\n",
            kind_name(node.info.kind)
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\n",
            x + W / 2.0,
            y + 18.0,
            xml_escape(&node.info.name)
        ));
        let sub = match node.info.kind {
            RootKind::Snapshot => format!("snapshot, {} excl.", size_to_str(node.exclusive)),
            RootKind::Vdi => format!("VDI, {} excl.", size_to_str(node.exclusive)),
        };
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></g>\n",
            x + W / 2.0,
            y + 34.0,
            xml_escape(&sub)
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(kind: RootKind, name: &str, vdi: &str, parent: Option<&str>, t: u64) -> RootInfo {
        RootInfo {
            kind,
            name: name.into(),
            uid: t + 1,
            vdi: vdi.into(),
            parent: parent.map(String::from),
            created_ns: t,
            size: 1 << 20,
            id: None,
        }
    }

    fn forest() -> Forest {
        Forest::build(&forest_roots(), &[])
    }

    fn forest_roots() -> Vec<RootInfo> {
        vec![
            root(RootKind::Vdi, "default", "default", None, 0),
            root(RootKind::Snapshot, "s1", "default", None, 10),
            root(RootKind::Snapshot, "s2", "default", Some("s1"), 20),
            root(RootKind::Vdi, "dev", "dev", Some("s1"), 15),
            root(RootKind::Snapshot, "d1", "dev", Some("s1"), 30),
            root(RootKind::Vdi, "test", "test", Some("s2"), 40),
        ]
    }

    #[test]
    fn vdis_head_their_snapshots_and_forks_hang_off_their_snapshot() {
        let f = forest();
        let name = |i: usize| f.nodes[i].info.name.as_str();
        let up = |n: &str| {
            let i = f.nodes.iter().position(|x| x.info.name == n).unwrap();
            f.nodes[i].up.map(name)
        };
        assert_eq!(up("default"), None);
        assert_eq!(up("s1"), Some("default"));
        assert_eq!(up("s2"), Some("default"));
        assert_eq!(up("dev"), Some("s1"));
        assert_eq!(up("d1"), Some("dev"));
        assert_eq!(up("test"), Some("s2"));
        let mut text = Vec::new();
        human(&mut text, &f).unwrap();
        let text = String::from_utf8(text).unwrap();
        let first: Vec<&str> = text
            .lines()
            .map(|l| l.split("  (").next().unwrap())
            .collect();
        assert_eq!(
            first,
            [
                "default",
                "├─ s1",
                "│  └─ dev",
                "│     └─ d1",
                "└─ s2",
                "   └─ test"
            ]
        );
    }

    #[test]
    fn a_revert_keeps_a_vdi_under_its_origin_and_orphans_hang_off_their_parent() {
        let mut roots = forest_roots();
        // dev reverted to its own snapshot d1: still forked from s1.
        roots[3].parent = Some("d1".into());
        // A snapshot of a deleted VDI: under its lineage parent.
        roots.push(root(RootKind::Snapshot, "x1", "gone", Some("s2"), 50));
        let f = Forest::build(&roots, &[]);
        let up = |n: &str| {
            let i = f.nodes.iter().position(|x| x.info.name == n).unwrap();
            f.nodes[i].up.map(|u| f.nodes[u].info.name.clone())
        };
        assert_eq!(up("dev").as_deref(), Some("s1"));
        assert_eq!(up("d1").as_deref(), Some("dev"));
        assert_eq!(up("x1").as_deref(), Some("s2"));
        assert_eq!(f.tops.len(), 1);
    }

    #[test]
    fn dot_quotes_names_and_svg_escapes_them() {
        let mut roots = vec![root(RootKind::Vdi, "default", "default", None, 0)];
        roots.push(root(RootKind::Snapshot, "a\"b<c", "default", None, 1));
        let f = Forest::build(&roots, &[]);
        let d = dot(&f);
        assert!(d.contains("\"default\" -> \"a\\\"b<c\";"), "{d}");
        let s = svg(&f);
        assert!(s.contains("a&quot;b&lt;c"), "{s}");
        assert!(!s.contains("a\"b<c"));
    }
}
