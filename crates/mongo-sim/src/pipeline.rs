//! Projections, the small expression language and aggregation stages over in-memory documents.

use bson::{doc, Bson, Document};

use crate::error::{CmdError, CmdResult};
use crate::limits::doc_size;
use crate::query::{as_f64, bson_eq, cmp_bson, Filter, Sort};
use crate::update::{set_path, type_name};

/// An aggregation expression: what `$project`/`$addFields`/`$group` may compute.
#[derive(Debug, Clone)]
pub(crate) enum Expr {
    /// `"$a.b"`.
    Path(String),
    /// `"$$ROOT"`.
    Root,
    /// A constant (or `$literal`).
    Literal(Bson),
    /// `{k: expr, …}`.
    Doc(Vec<(String, Expr)>),
    /// `[expr, …]`.
    Array(Vec<Expr>),
    /// `{$bsonSize: expr}`: the encoded size of a document (how a change-stream consumer can
    /// find which events are near the 16 MiB limit).
    BsonSize(Box<Expr>),
}

impl Expr {
    /// Parses an expression; operators other than `$literal` are rejected by name.
    pub(crate) fn parse(v: &Bson) -> CmdResult<Expr> {
        Ok(match v {
            Bson::String(s) if s == "$$ROOT" || s == "$$CURRENT" => Expr::Root,
            Bson::String(s) if s.starts_with("$$ROOT.") || s.starts_with("$$CURRENT.") => {
                Expr::Path(
                    s.split_once('.')
                        .map(|x| x.1)
                        .unwrap_or_default()
                        .to_owned(),
                )
            }
            Bson::String(s) if s.starts_with("$$") => {
                return Err(CmdError::unsupported(format!("the variable '{s}'")))
            }
            Bson::String(s) if s.starts_with('$') => {
                let p = &s[1..];
                if p.is_empty() {
                    return Err(CmdError::new(
                        16872,
                        "'$' by itself is not a valid FieldPath",
                    ));
                }
                Expr::Path(p.to_owned())
            }
            Bson::Document(d) => match d.keys().next() {
                Some(k) if k.starts_with('$') => {
                    match (k.as_str(), d.iter().next()) {
                        ("$literal", Some((_, v))) if d.len() == 1 => Expr::Literal(v.clone()),
                        ("$bsonSize", Some((_, v))) if d.len() == 1 => {
                            // mongod accepts the argument bare or as a one-element array.
                            let arg = match v {
                                Bson::Array(a) if a.len() == 1 => &a[0],
                                Bson::Array(a) => {
                                    return Err(CmdError::new(16020, format!("Expression $bsonSize takes exactly 1 arguments. {} were passed in.", a.len())))
                                }
                                v => v,
                            };
                            Expr::BsonSize(Box::new(Expr::parse(arg)?))
                        }
                        _ => return Err(CmdError::new(168, format!("Unrecognized expression '{k}' (mongo-sim supports only field paths, $$ROOT, $literal, $bsonSize and constants)"))),
                    }
                }
                _ => Expr::Doc(
                    d.iter()
                        .map(|(k, v)| Ok((k.clone(), Expr::parse(v)?)))
                        .collect::<CmdResult<_>>()?,
                ),
            },
            Bson::Array(a) => Expr::Array(a.iter().map(Expr::parse).collect::<CmdResult<_>>()?),
            other => Expr::Literal(other.clone()),
        })
    }

    /// Evaluates against a document; `Ok(None)` means "missing".
    pub(crate) fn eval(&self, doc: &Document) -> CmdResult<Option<Bson>> {
        Ok(match self {
            // Measured without copying the whole document, which may be a 16 MiB event.
            Expr::BsonSize(inner) if matches!(**inner, Expr::Root) => {
                Some(Bson::Int32(doc_size(doc) as i32))
            }
            Expr::BsonSize(inner) => match inner.eval(doc)? {
                None | Some(Bson::Null) | Some(Bson::Undefined) => Some(Bson::Null),
                Some(Bson::Document(d)) => Some(Bson::Int32(doc_size(&d) as i32)),
                Some(other) => {
                    return Err(CmdError::new(
                        31393,
                        format!(
                            "$bsonSize requires a document input, found: {}",
                            type_name(&other)
                        ),
                    ))
                }
            },
            Expr::Root => Some(Bson::Document(doc.clone())),
            Expr::Literal(v) => Some(v.clone()),
            Expr::Path(p) => {
                let parts: Vec<&str> = p.split('.').collect();
                let Some((first, rest)) = parts.split_first() else {
                    return Ok(None);
                };
                doc.get(*first).and_then(|v| eval_path(v, rest))
            }
            Expr::Doc(fields) => {
                let mut out = Document::new();
                for (k, e) in fields {
                    if let Some(v) = e.eval(doc)? {
                        out.insert(k.clone(), v);
                    }
                }
                Some(Bson::Document(out))
            }
            Expr::Array(items) => Some(Bson::Array(
                items
                    .iter()
                    .map(|e| Ok(e.eval(doc)?.unwrap_or(Bson::Null)))
                    .collect::<CmdResult<_>>()?,
            )),
        })
    }
}

fn eval_path(v: &Bson, rest: &[&str]) -> Option<Bson> {
    let Some((first, tail)) = rest.split_first() else {
        return Some(v.clone());
    };
    match v {
        Bson::Document(d) => eval_path(d.get(*first)?, tail),
        Bson::Array(a) => Some(Bson::Array(
            a.iter()
                .filter_map(|e| match e {
                    Bson::Document(_) | Bson::Array(_) => eval_path(e, rest),
                    _ => None,
                })
                .collect(),
        )),
        _ => None,
    }
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<(String, Node)>,
    leaf: bool,
}

impl Node {
    fn add(&mut self, path: &str) {
        let mut cur = self;
        for part in path.split('.') {
            let idx = match cur.children.iter().position(|(k, _)| k == part) {
                Some(i) => i,
                None => {
                    cur.children.push((part.to_owned(), Node::default()));
                    cur.children.len() - 1
                }
            };
            cur = &mut cur.children[idx].1;
        }
        cur.leaf = true;
    }

    fn get(&self, k: &str) -> Option<&Node> {
        self.children.iter().find(|(c, _)| c == k).map(|(_, n)| n)
    }
}

/// A compiled projection (find's `projection` and `$project`).
#[derive(Debug, Clone)]
pub(crate) struct Projection {
    include: bool,
    tree: Node,
    id: Option<bool>,
    computed: Vec<(String, Expr)>,
}

fn truthy_number(v: &Bson) -> Option<bool> {
    match v {
        Bson::Boolean(b) => Some(*b),
        other => as_f64(other).map(|f| f != 0.0),
    }
}

impl Projection {
    /// Compiles a projection spec; `None` for an empty spec.
    pub(crate) fn parse(spec: &Document) -> CmdResult<Option<Projection>> {
        if spec.is_empty() {
            return Ok(None);
        }
        let mut p = Projection {
            include: false,
            tree: Node::default(),
            id: None,
            computed: Vec::new(),
        };
        let mut mode: Option<bool> = None;
        p.collect(spec, "", &mut mode)?;
        p.include = mode.unwrap_or(false) || !p.computed.is_empty();
        if mode.is_none() && p.computed.is_empty() {
            // Only `_id` was mentioned: `{_id: 0}` excludes, `{_id: 1}` includes just `_id`.
            p.include = p.id == Some(true);
        }
        Ok(Some(p))
    }

    fn collect(&mut self, spec: &Document, prefix: &str, mode: &mut Option<bool>) -> CmdResult<()> {
        for (k, v) in spec {
            if k.starts_with('$')
                || k.split('.').any(|s| s == "$" || s.is_empty())
                || k.ends_with(".$")
            {
                return Err(CmdError::unsupported(format!(
                    "the projection field '{k}' (positional or operator projection)"
                )));
            }
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let Some(on) = truthy_number(v) {
                if path == "_id" {
                    self.id = Some(on);
                    continue;
                }
                match *mode {
                    Some(m) if m != on => {
                        return Err(if m {
                            CmdError::new(
                                31254,
                                format!(
                                    "Cannot do exclusion on field {path} in inclusion projection"
                                ),
                            )
                        } else {
                            CmdError::new(
                                31253,
                                format!(
                                    "Cannot do inclusion on field {path} in exclusion projection"
                                ),
                            )
                        })
                    }
                    _ => *mode = Some(on),
                }
                self.tree.add(&path);
                continue;
            }
            match v {
                Bson::Document(d) if d.keys().next().is_some_and(|x| x.starts_with('$')) => {
                    let op = d.keys().next().cloned().unwrap_or_default();
                    if matches!(op.as_str(), "$slice" | "$elemMatch" | "$meta") {
                        return Err(CmdError::unsupported(format!(
                            "the projection operator {op}"
                        )));
                    }
                    self.computed.push((path, Expr::parse(v)?));
                }
                Bson::Document(d) => self.collect(d, &path, mode)?,
                _ => self.computed.push((path, Expr::parse(v)?)),
            }
        }
        if !self.computed.is_empty() && *mode == Some(false) {
            return Err(CmdError::new(
                31252,
                "Cannot use expression other than $meta in exclusion projection",
            ));
        }
        Ok(())
    }

    /// Applies the projection (only a computed field can fail).
    pub(crate) fn apply(&self, doc: &Document) -> CmdResult<Document> {
        let mut out = if self.include {
            let mut out = Document::new();
            if self.id != Some(false) {
                if let Some(id) = doc.get("_id") {
                    out.insert("_id", id.clone());
                }
            }
            include_into(doc, &self.tree, &mut out, true);
            out
        } else {
            let mut out = exclude(doc, &self.tree);
            if self.id == Some(false) {
                out.remove("_id");
            }
            out
        };
        for (path, e) in &self.computed {
            if let Some(v) = e.eval(doc)? {
                // set_path only fails through scalars, which a fresh projection output cannot hold
                // where a computed path goes unless the spec itself conflicts; ignore such a field.
                let _ = set_path(&mut out, path, v);
            }
        }
        Ok(out)
    }
}

fn include_into(doc: &Document, node: &Node, out: &mut Document, top: bool) {
    for (k, v) in doc {
        if top && k == "_id" {
            continue;
        }
        let Some(child) = node.get(k) else { continue };
        if child.leaf {
            out.insert(k.clone(), v.clone());
            continue;
        }
        match v {
            Bson::Document(sub) => {
                let mut o = Document::new();
                include_into(sub, child, &mut o, false);
                out.insert(k.clone(), o);
            }
            Bson::Array(a) => {
                let items: Vec<Bson> = a
                    .iter()
                    .filter_map(|e| match e {
                        Bson::Document(sub) => {
                            let mut o = Document::new();
                            include_into(sub, child, &mut o, false);
                            Some(Bson::Document(o))
                        }
                        _ => None,
                    })
                    .collect();
                out.insert(k.clone(), items);
            }
            _ => {}
        }
    }
}

fn exclude(doc: &Document, node: &Node) -> Document {
    let mut out = Document::new();
    for (k, v) in doc {
        match node.get(k) {
            None => {
                out.insert(k.clone(), v.clone());
            }
            Some(child) if child.leaf => {}
            Some(child) => {
                let nv = match v {
                    Bson::Document(sub) => Bson::Document(exclude(sub, child)),
                    Bson::Array(a) => Bson::Array(
                        a.iter()
                            .map(|e| match e {
                                Bson::Document(sub) => Bson::Document(exclude(sub, child)),
                                other => other.clone(),
                            })
                            .collect(),
                    ),
                    other => other.clone(),
                };
                out.insert(k.clone(), nv);
            }
        }
    }
    out
}

/// An accumulator of `$group`.
#[derive(Debug, Clone)]
enum Acc {
    Sum(Expr),
    Avg(Expr),
    Min(Expr),
    Max(Expr),
    First(Expr),
    Last(Expr),
    Push(Expr),
    AddToSet(Expr),
}

/// A compiled aggregation stage.
#[derive(Debug, Clone)]
pub(crate) enum Stage {
    /// `$match`.
    Match(Filter),
    /// `$project`.
    Project(Projection),
    /// `$addFields` / `$set`.
    AddFields(Vec<(String, Expr)>),
    /// `$unset`.
    Unset(Vec<String>),
    /// `$replaceRoot` / `$replaceWith`.
    ReplaceRoot(Expr),
    /// `$sort`.
    Sort(Sort),
    /// `$skip`.
    Skip(u64),
    /// `$limit`.
    Limit(u64),
    /// `$count`.
    Count(String),
    /// `$unwind`: path and whether to keep documents without elements.
    Unwind(String, bool),
    /// `$group`.
    Group(Expr, Vec<(String, AccPub)>),
}

/// Opaque accumulator wrapper.
#[derive(Debug, Clone)]
pub(crate) struct AccPub(Acc);

impl Stage {
    /// The stage's name, for error messages.
    pub(crate) fn is_streaming(&self) -> bool {
        matches!(
            self,
            Stage::Match(_)
                | Stage::Project(_)
                | Stage::AddFields(_)
                | Stage::Unset(_)
                | Stage::ReplaceRoot(_)
        )
    }

    /// Parses one `{$stage: spec}` document.
    pub(crate) fn parse(d: &Document) -> CmdResult<Stage> {
        if d.len() != 1 {
            return Err(CmdError::new(
                40323,
                "A pipeline stage specification object must contain exactly one field.",
            ));
        }
        let Some((name, spec)) = d.iter().next() else {
            return Err(CmdError::new(
                40323,
                "A pipeline stage specification object must contain exactly one field.",
            ));
        };
        let as_doc = |what: &str| -> CmdResult<&Document> {
            match spec {
                Bson::Document(x) => Ok(x),
                _ => Err(CmdError::failed_to_parse(format!(
                    "{what} specification must be an object"
                ))),
            }
        };
        let as_count = |what: &str| -> CmdResult<u64> {
            match as_f64(spec) {
                Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(f as u64),
                _ => Err(CmdError::failed_to_parse(format!(
                    "invalid argument to {what} stage: expected a non-negative whole number"
                ))),
            }
        };
        Ok(match name.as_str() {
            "$match" => Stage::Match(Filter::parse(as_doc("$match")?)?),
            "$project" => match Projection::parse(as_doc("$project")?)? {
                Some(p) => Stage::Project(p),
                None => return Err(CmdError::new(51272, "Invalid $project :: caused by :: projection specification must have at least one field")),
            },
            "$addFields" | "$set" => Stage::AddFields(
                as_doc(name)?.iter().map(|(k, v)| Ok((k.clone(), Expr::parse(v)?))).collect::<CmdResult<_>>()?,
            ),
            "$unset" => Stage::Unset(match spec {
                Bson::String(s) => vec![s.clone()],
                Bson::Array(a) => a
                    .iter()
                    .map(|e| match e {
                        Bson::String(s) => Ok(s.clone()),
                        _ => Err(CmdError::failed_to_parse("$unset specification must be a string or an array containing only string values")),
                    })
                    .collect::<CmdResult<_>>()?,
                _ => return Err(CmdError::failed_to_parse("$unset specification must be a string or an array")),
            }),
            "$replaceRoot" => Stage::ReplaceRoot(Expr::parse(as_doc("$replaceRoot")?.get("newRoot").ok_or_else(|| CmdError::new(40231, "no newRoot specified for the $replaceRoot stage"))?)?),
            "$replaceWith" => Stage::ReplaceRoot(Expr::parse(spec)?),
            "$sort" => Stage::Sort(Sort::parse(as_doc("$sort")?)?),
            "$skip" => Stage::Skip(as_count("$skip")?),
            "$limit" => Stage::Limit(as_count("$limit")?),
            "$count" => match spec {
                Bson::String(s) if !s.is_empty() && !s.starts_with('$') && !s.contains('.') => Stage::Count(s.clone()),
                _ => return Err(CmdError::new(40156, "the count field must be a non-empty string")),
            },
            "$unwind" => match spec {
                Bson::String(s) if s.starts_with('$') => Stage::Unwind(s[1..].to_owned(), false),
                Bson::Document(o) => {
                    for k in o.keys() {
                        if k != "path" && k != "preserveNullAndEmptyArrays" {
                            return Err(CmdError::unsupported(format!("the $unwind option '{k}'")));
                        }
                    }
                    let path = o.get_str("path").ok().filter(|p| p.starts_with('$')).ok_or_else(|| CmdError::new(28812, "no path specified to $unwind stage"))?;
                    Stage::Unwind(path[1..].to_owned(), o.get_bool("preserveNullAndEmptyArrays").unwrap_or(false))
                }
                _ => return Err(CmdError::new(15981, "expected either a string or an object as specification for $unwind stage")),
            },
            "$group" => {
                let g = as_doc("$group")?;
                let id = Expr::parse(g.get("_id").ok_or_else(|| CmdError::new(15955, "a group specification must include an _id"))?)?;
                let mut accs = Vec::new();
                for (k, v) in g {
                    if k == "_id" {
                        continue;
                    }
                    let Bson::Document(a) = v else {
                        return Err(CmdError::new(40234, format!("The field '{k}' must be an accumulator object")));
                    };
                    let Some((op, arg)) = a.iter().next().filter(|_| a.len() == 1) else {
                        return Err(CmdError::new(40238, format!("The field '{k}' must specify one accumulator")));
                    };
                    let e = || Expr::parse(arg);
                    let acc = match op.as_str() {
                        "$sum" => Acc::Sum(e()?),
                        "$count" => Acc::Sum(Expr::Literal(Bson::Int32(1))),
                        "$avg" => Acc::Avg(e()?),
                        "$min" => Acc::Min(e()?),
                        "$max" => Acc::Max(e()?),
                        "$first" => Acc::First(e()?),
                        "$last" => Acc::Last(e()?),
                        "$push" => Acc::Push(e()?),
                        "$addToSet" => Acc::AddToSet(e()?),
                        other => return Err(CmdError::new(15952, format!("unknown group operator '{other}' (or not supported by mongo-sim)"))),
                    };
                    accs.push((k.clone(), AccPub(acc)));
                }
                Stage::Group(id, accs)
            }
            other if other.starts_with('$') && KNOWN_STAGES.contains(&other) => {
                return Err(CmdError::new(40324, format!("mongo-sim does not support the pipeline stage '{other}'")));
            }
            other => return Err(CmdError::new(40324, format!("Unrecognized pipeline stage name: '{other}'"))),
        })
    }

    /// Applies a streaming stage to one document (`None` = filtered out).
    pub(crate) fn apply_one(&self, doc: Document) -> CmdResult<Option<Document>> {
        Ok(match self {
            Stage::Match(f) => f.matches(&doc).then_some(doc),
            Stage::Project(p) => Some(p.apply(&doc)?),
            Stage::AddFields(fields) => {
                let mut out = doc.clone();
                for (path, e) in fields {
                    match e.eval(&doc)? {
                        Some(v) => set_path(&mut out, path, v)?,
                        None => {
                            out.remove(path);
                        }
                    }
                }
                Some(out)
            }
            Stage::Unset(paths) => {
                let spec: Document = paths.iter().map(|p| (p.clone(), Bson::Int32(0))).collect();
                match Projection::parse(&spec)? {
                    Some(p) => Some(p.apply(&doc)?),
                    None => Some(doc),
                }
            }
            Stage::ReplaceRoot(e) => match e.eval(&doc)? {
                Some(Bson::Document(d)) => Some(d),
                other => {
                    return Err(CmdError::new(40228, format!("'newRoot' expression must evaluate to an object, but resulting value was: {}", other.map(|v| v.to_string()).unwrap_or_else(|| "MISSING".into()))))
                }
            },
            _ => Some(doc),
        })
    }
}

/// Stage names mongod knows but this simulator does not implement (named in the error).
const KNOWN_STAGES: &[&str] = &[
    "$lookup",
    "$facet",
    "$bucket",
    "$bucketAuto",
    "$sortByCount",
    "$sample",
    "$out",
    "$merge",
    "$graphLookup",
    "$geoNear",
    "$indexStats",
    "$collStats",
    "$currentOp",
    "$listSessions",
    "$redact",
    "$setWindowFields",
    "$densify",
    "$fill",
    "$unionWith",
    "$documents",
    "$search",
    "$planCacheStats",
];

/// Runs a pipeline over documents.
pub(crate) fn run(stages: &[Stage], mut docs: Vec<Document>) -> CmdResult<Vec<Document>> {
    for s in stages {
        docs = match s {
            Stage::Sort(sort) => {
                sort.apply(&mut docs);
                docs
            }
            Stage::Skip(n) => docs.into_iter().skip(*n as usize).collect(),
            Stage::Limit(n) => docs.into_iter().take(*n as usize).collect(),
            Stage::Count(name) => {
                if docs.is_empty() {
                    Vec::new()
                } else {
                    vec![doc! {name.clone(): docs.len() as i32}]
                }
            }
            Stage::Unwind(path, keep) => {
                let mut out = Vec::new();
                for d in docs {
                    match crate::query::get_path(&d, path) {
                        Some(Bson::Array(a)) if !a.is_empty() => {
                            for e in a.clone() {
                                let mut nd = d.clone();
                                set_path(&mut nd, path, e)?;
                                out.push(nd);
                            }
                        }
                        Some(Bson::Array(_)) | None | Some(Bson::Null) => {
                            if *keep {
                                out.push(d);
                            }
                        }
                        Some(_) => out.push(d),
                    }
                }
                out
            }
            Stage::Group(id, accs) => group(&docs, id, accs)?,
            streaming => {
                let mut out = Vec::with_capacity(docs.len());
                for d in docs {
                    if let Some(d) = streaming.apply_one(d)? {
                        out.push(d);
                    }
                }
                out
            }
        };
    }
    Ok(docs)
}

fn group(docs: &[Document], id: &Expr, accs: &[(String, AccPub)]) -> CmdResult<Vec<Document>> {
    let mut groups: Vec<(Bson, Vec<&Document>)> = Vec::new();
    for d in docs {
        let key = id.eval(d)?.unwrap_or(Bson::Null);
        match groups.iter_mut().find(|(k, _)| bson_eq(k, &key)) {
            Some((_, members)) => members.push(d),
            None => groups.push((key, vec![d])),
        }
    }
    groups
        .into_iter()
        .map(|(key, members)| {
            let mut out = doc! {"_id": key};
            for (name, AccPub(acc)) in accs {
                let vals = |e: &Expr| -> CmdResult<Vec<Bson>> {
                    let mut out = Vec::new();
                    for d in &members {
                        out.extend(e.eval(d)?);
                    }
                    Ok(out)
                };
                let v = match acc {
                    Acc::Sum(e) => sum(&vals(e)?),
                    Acc::Avg(e) => {
                        let nums: Vec<f64> = vals(e)?.iter().filter_map(as_f64).collect();
                        if nums.is_empty() {
                            Bson::Null
                        } else {
                            Bson::Double(nums.iter().sum::<f64>() / nums.len() as f64)
                        }
                    }
                    Acc::Min(e) => vals(e)?
                        .into_iter()
                        .filter(|v| !matches!(v, Bson::Null))
                        .min_by(cmp_bson)
                        .unwrap_or(Bson::Null),
                    Acc::Max(e) => vals(e)?
                        .into_iter()
                        .filter(|v| !matches!(v, Bson::Null))
                        .max_by(cmp_bson)
                        .unwrap_or(Bson::Null),
                    Acc::First(e) => match members.first() {
                        Some(d) => e.eval(d)?.unwrap_or(Bson::Null),
                        None => Bson::Null,
                    },
                    Acc::Last(e) => match members.last() {
                        Some(d) => e.eval(d)?.unwrap_or(Bson::Null),
                        None => Bson::Null,
                    },
                    Acc::Push(e) => Bson::Array(vals(e)?),
                    Acc::AddToSet(e) => {
                        let mut set: Vec<Bson> = Vec::new();
                        for v in vals(e)? {
                            if !set.iter().any(|s| bson_eq(s, &v)) {
                                set.push(v);
                            }
                        }
                        Bson::Array(set)
                    }
                };
                out.insert(name.clone(), v);
            }
            Ok(out)
        })
        .collect()
}

fn sum(vals: &[Bson]) -> Bson {
    let mut int: i64 = 0;
    let mut is_long = false;
    let mut float: Option<f64> = None;
    for v in vals {
        match v {
            Bson::Int32(x) => int = int.saturating_add(*x as i64),
            Bson::Int64(x) => {
                int = int.saturating_add(*x);
                is_long = true;
            }
            other => {
                if let Some(f) = as_f64(other) {
                    float = Some(float.unwrap_or(0.0) + f);
                }
            }
        }
    }
    match float {
        Some(f) => Bson::Double(f + int as f64),
        None if is_long || i32::try_from(int).is_err() => Bson::Int64(int),
        None => Bson::Int32(int as i32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(spec: Document, d: Document) -> Document {
        Projection::parse(&spec)
            .unwrap()
            .unwrap()
            .apply(&d)
            .unwrap()
    }

    #[test]
    fn projections() {
        let d = doc! {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 2}]};
        assert_eq!(p(doc! {"a": 1}, d.clone()), doc! {"_id": 1, "a": 1});
        assert_eq!(
            p(doc! {"b.c": 1, "_id": 0}, d.clone()),
            doc! {"b": {"c": 2}}
        );
        assert_eq!(
            p(doc! {"e.c": 1}, d.clone()),
            doc! {"_id": 1, "e": [{"c": 1}]}
        );
        assert_eq!(p(doc! {"b": 0, "e": 0}, d.clone()), doc! {"_id": 1, "a": 1});
        assert_eq!(p(doc! {"x": "$b.c"}, d.clone()), doc! {"_id": 1, "x": 2});
        assert_eq!(
            Projection::parse(&doc! {"a": 1, "b": 0}).unwrap_err().code,
            31254
        );
        assert!(Projection::parse(&doc! {"a": {"$slice": 1}})
            .unwrap_err()
            .msg
            .contains("$slice"));
    }

    #[test]
    fn count_documents_shape() {
        let stages: Vec<Stage> = [
            doc! {"$match": {"a": {"$gt": 0}}},
            doc! {"$skip": 1},
            doc! {"$limit": 5},
            doc! {"$group": {"_id": 1, "n": {"$sum": 1}}},
        ]
        .iter()
        .map(|d| Stage::parse(d).unwrap())
        .collect();
        let docs = (0..4).map(|i| doc! {"a": i}).collect();
        assert_eq!(run(&stages, docs).unwrap(), vec![doc! {"_id": 1, "n": 2}]);
    }

    #[test]
    fn unknown_stages_are_named() {
        let e = Stage::parse(&doc! {"$frobnicate": {}}).unwrap_err();
        assert_eq!(e.code, 40324);
        assert!(e.msg.contains("$frobnicate"));
        let e = Stage::parse(&doc! {"$lookup": {}}).unwrap_err();
        assert!(e.msg.contains("$lookup"));
    }
}
